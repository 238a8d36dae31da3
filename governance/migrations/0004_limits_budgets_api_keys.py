"""Daily token quotas become general usage limits (per user, group or API key; per minute, day
and month; tokens and cost), token usage becomes budget usage per period, and API keys arrive.
"""

from decimal import Decimal

import django.contrib.postgres.fields
import django.core.validators
import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def link_reservations_to_usage(apps, schema_editor):
    QuotaReservation = apps.get_model("governance", "QuotaReservation")
    for reservation in QuotaReservation.objects.select_related("usage").iterator():
        reservation.usages.add(reservation.usage)
        reservation.user_id = reservation.usage.user_id
        reservation.save(update_fields=["user"])


def cost_field(**kwargs):
    return models.DecimalField(
        max_digits=14,
        decimal_places=6,
        null=True,
        blank=True,
        validators=[django.core.validators.MinValueValidator(Decimal("0"))],
        **kwargs,
    )


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("governance", "0003_audit_hash_chain"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="ApiKey",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=100)),
                ("prefix", models.CharField(editable=False, max_length=16, unique=True)),
                ("secret_hash", models.CharField(editable=False, max_length=64)),
                (
                    "scopes",
                    django.contrib.postgres.fields.ArrayField(
                        base_field=models.CharField(
                            choices=[("chat", "chat completions"), ("embeddings", "embeddings"), ("models", "list models")],
                            max_length=20,
                        ),
                        default=list,
                        size=None,
                    ),
                ),
                ("expires_at", models.DateTimeField(blank=True, null=True)),
                ("revoked_at", models.DateTimeField(blank=True, editable=False, null=True)),
                ("last_used_at", models.DateTimeField(blank=True, editable=False, null=True)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "user",
                    models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="api_keys", to=settings.AUTH_USER_MODEL),
                ),
            ],
            options={"verbose_name": "API key", "ordering": ["-created_at", "-id"]},
        ),
        # DailyTokenQuota -> UsageLimit
        migrations.RemoveConstraint(model_name="dailytokenquota", name="one_daily_token_quota_per_user"),
        migrations.RenameModel(old_name="DailyTokenQuota", new_name="UsageLimit"),
        migrations.AlterField(
            model_name="usagelimit",
            name="user",
            field=models.OneToOneField(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name="usage_limit", to=settings.AUTH_USER_MODEL),
        ),
        migrations.AlterField(
            model_name="usagelimit",
            name="tokens_per_day",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="usagelimit",
            name="group",
            field=models.OneToOneField(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name="usage_limit", to="auth.group"),
        ),
        migrations.AddField(
            model_name="usagelimit",
            name="api_key",
            field=models.OneToOneField(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name="usage_limit", to="governance.apikey"),
        ),
        migrations.AddField(model_name="usagelimit", name="requests_per_minute", field=models.PositiveIntegerField(blank=True, null=True)),
        migrations.AddField(model_name="usagelimit", name="tokens_per_minute", field=models.PositiveIntegerField(blank=True, null=True)),
        migrations.AddField(model_name="usagelimit", name="tokens_per_month", field=models.PositiveIntegerField(blank=True, null=True)),
        migrations.AddField(model_name="usagelimit", name="cost_per_day", field=cost_field(help_text="In the currency of the model prices")),
        migrations.AddField(model_name="usagelimit", name="cost_per_month", field=cost_field(help_text="In the currency of the model prices")),
        migrations.AddConstraint(
            model_name="usagelimit",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("group__isnull", True), ("user__isnull", True)),
                    models.Q(("api_key__isnull", True), ("user__isnull", True)),
                    models.Q(("api_key__isnull", True), ("group__isnull", True)),
                    _connector="OR",
                ),
                name="usage_limit_has_at_most_one_subject",
                violation_error_message="A limit applies to a user, a group or an API key: choose one of them (or none, for the default).",
            ),
        ),
        migrations.AddConstraint(
            model_name="usagelimit",
            constraint=models.UniqueConstraint(
                fields=("user", "group", "api_key"),
                name="one_usage_limit_per_subject",
                nulls_distinct=False,
                violation_error_message="There is already a limit for this subject.",
            ),
        ),
        migrations.AddConstraint(
            model_name="usagelimit",
            constraint=models.CheckConstraint(
                condition=(models.Q(("cost_per_day__isnull", True)) | models.Q(("cost_per_day__gte", 0)))
                & (models.Q(("cost_per_month__isnull", True)) | models.Q(("cost_per_month__gte", 0))),
                name="usage_limit_costs_not_negative",
            ),
        ),
        # TokenUsage -> BudgetUsage
        migrations.RemoveConstraint(model_name="tokenusage", name="one_token_usage_per_user_day"),
        migrations.RenameModel(old_name="TokenUsage", new_name="BudgetUsage"),
        migrations.RenameField(model_name="budgetusage", old_name="day", new_name="period_start"),
        migrations.RenameField(model_name="budgetusage", old_name="reserved", new_name="tokens_reserved"),
        migrations.RenameField(model_name="budgetusage", old_name="used", new_name="tokens_used"),
        migrations.AlterField(model_name="budgetusage", name="tokens_reserved", field=models.PositiveBigIntegerField(default=0)),
        migrations.AlterField(model_name="budgetusage", name="tokens_used", field=models.PositiveBigIntegerField(default=0)),
        migrations.AlterField(
            model_name="budgetusage",
            name="user",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddField(
            model_name="budgetusage",
            name="group",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, to="auth.group"),
        ),
        migrations.AddField(
            model_name="budgetusage",
            name="api_key",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, to="governance.apikey"),
        ),
        migrations.AddField(
            model_name="budgetusage",
            name="period",
            field=models.CharField(choices=[("day", "Day"), ("month", "Month")], default="day", max_length=5),
            preserve_default=False,
        ),
        migrations.AddField(model_name="budgetusage", name="cost_reserved", field=models.DecimalField(decimal_places=6, default=Decimal("0"), max_digits=14)),
        migrations.AddField(model_name="budgetusage", name="cost_used", field=models.DecimalField(decimal_places=6, default=Decimal("0"), max_digits=14)),
        migrations.AddConstraint(
            model_name="budgetusage",
            constraint=models.UniqueConstraint(
                fields=("user", "group", "api_key", "period", "period_start"),
                name="one_budget_usage_per_subject_period",
                nulls_distinct=False,
            ),
        ),
        migrations.AddConstraint(
            model_name="budgetusage",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("api_key__isnull", True), ("group__isnull", True), ("user__isnull", False)),
                    models.Q(("api_key__isnull", True), ("group__isnull", False), ("user__isnull", True)),
                    models.Q(("api_key__isnull", False), ("group__isnull", True), ("user__isnull", True)),
                    _connector="OR",
                ),
                name="budget_usage_has_one_subject",
            ),
        ),
        # QuotaReservation: held in every budget that applies, with the cost and the prices.
        migrations.AddField(
            model_name="quotareservation",
            name="usages",
            field=models.ManyToManyField(blank=True, related_name="reservations", to="governance.budgetusage"),
        ),
        migrations.AddField(
            model_name="quotareservation",
            name="user",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddField(
            model_name="quotareservation",
            name="api_key",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, to="governance.apikey"),
        ),
        migrations.RunPython(link_reservations_to_usage, migrations.RunPython.noop),
        migrations.RemoveField(model_name="quotareservation", name="usage"),
        migrations.AddField(model_name="quotareservation", name="cost", field=models.DecimalField(decimal_places=6, default=Decimal("0"), max_digits=14)),
        migrations.AddField(model_name="quotareservation", name="price_input_per_1k", field=models.DecimalField(decimal_places=6, default=Decimal("0"), max_digits=12)),
        migrations.AddField(model_name="quotareservation", name="price_output_per_1k", field=models.DecimalField(decimal_places=6, default=Decimal("0"), max_digits=12)),
        migrations.AddField(model_name="quotareservation", name="settled_cost", field=models.DecimalField(blank=True, decimal_places=6, max_digits=14, null=True)),
        migrations.CreateModel(
            name="RetentionPolicy",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                (
                    "conversation_days",
                    models.PositiveIntegerField(
                        blank=True,
                        null=True,
                        validators=[django.core.validators.MinValueValidator(1)],
                        help_text="Delete conversations this many days after their last message. Leave empty to keep them until their owner deletes them.",
                    ),
                ),
                ("updated_at", models.DateTimeField(auto_now=True)),
            ],
            options={
                "verbose_name_plural": "retention policy",
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("conversation_days__isnull", True)) | models.Q(("conversation_days__gte", 1)),
                        name="retention_at_least_one_day",
                    )
                ],
            },
        ),
    ]
