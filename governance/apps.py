from django.apps import AppConfig


class GovernanceConfig(AppConfig):
    name = "governance"

    def ready(self) -> None:
        from django.contrib.auth.models import Group, User
        from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed

        from genai_site.config_cache import config_models_watch, config_relations_watch
        from governance import signals
        from governance.models import ApiKey, BlockedTerm, ReviewPolicy, SafetyPolicy, UsageLimit
        from models_admin.signals import registry_changed

        # The safety filters and review policies read these on every request, from each
        # process's cache.
        config_models_watch(SafetyPolicy, BlockedTerm, ReviewPolicy)
        # Admission reads the limits that apply to a user and key on every request, from the
        # same cache; group membership decides which groups' limits apply.
        config_models_watch(UsageLimit, Group)
        config_relations_watch(User.groups.through)
        # The /v1 API authenticates from the same cache: revoking or editing a key, and
        # deactivating (or editing) its owner, apply from the next request. Logging in saves
        # only `last_login`, which no cached reader uses.
        config_models_watch(ApiKey)
        config_models_watch(User, ignoring=("last_login",))

        user_logged_in.connect(signals.audit_user_logged_in, dispatch_uid="governance.audit.login")
        user_logged_out.connect(
            signals.audit_user_logged_out, dispatch_uid="governance.audit.logout"
        )
        user_login_failed.connect(
            signals.audit_user_login_failed, dispatch_uid="governance.audit.login_failed"
        )
        registry_changed.connect(
            signals.audit_registry_changed, dispatch_uid="governance.audit.registry"
        )
