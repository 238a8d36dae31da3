import datetime as dt

from django import forms

from governance.models import ApiKey


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100)
    scopes = forms.MultipleChoiceField(
        choices=ApiKey.Scope.choices,
        widget=forms.CheckboxSelectMultiple,
        initial=[ApiKey.Scope.CHAT],
    )
    expires_in_days = forms.IntegerField(
        min_value=1, max_value=3650, required=False, help_text="Leave empty for no expiry."
    )
    requests_per_minute = forms.IntegerField(min_value=0, required=False)
    tokens_per_day = forms.IntegerField(min_value=0, required=False)

    def expiry(self, now: dt.datetime) -> dt.datetime | None:
        days = self.cleaned_data.get("expires_in_days")
        return now + dt.timedelta(days=days) if days else None
