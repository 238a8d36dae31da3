from django.db import migrations

DEFAULT_TOKENS_PER_DAY = 200_000


def create_default(apps, schema_editor):
    DailyTokenQuota = apps.get_model("governance", "DailyTokenQuota")
    if not DailyTokenQuota.objects.filter(user__isnull=True).exists():
        DailyTokenQuota.objects.create(user=None, tokens_per_day=DEFAULT_TOKENS_PER_DAY)


class Migration(migrations.Migration):
    dependencies = [("governance", "0001_initial")]

    operations = [migrations.RunPython(create_default, migrations.RunPython.noop)]
