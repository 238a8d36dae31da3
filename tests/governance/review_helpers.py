"""Rows the review tests need: a registry entry, a policy, reviewers, queued items."""

from django.contrib.auth.models import Group, User

from governance.models import ReviewItem, ReviewPolicy
from governance.review_queue import REVIEWERS_GROUP, review_item_create
from models_admin.models import Deployment, Model, ModelVersion
from tests.factories import user_create


def version_create(name: str = "m", version: str = "v1", alias: str = "alias") -> ModelVersion:
    model, _ = Model.objects.get_or_create(name=name)
    mv = ModelVersion.objects.create(
        model=model, version=version, artifact_path=f"{name}/{version}", sha256="0" * 64
    )
    Deployment.objects.get_or_create(alias=alias, defaults={"primary_version": mv})
    return mv


def reviewer_create(username: str) -> User:
    user = user_create(username=username)
    group, _ = Group.objects.get_or_create(name=REVIEWERS_GROUP)
    user.groups.add(group)
    return user


def policy_create(
    kind: str = ReviewPolicy.Kind.DEPLOYMENT_APPROVAL, **fields: object
) -> ReviewPolicy:
    return ReviewPolicy.objects.create(name=f"{kind} policy", kind=kind, **fields)


def item_create(
    policy: ReviewPolicy, target_id: object, *, text: str = "The answer.", target_type: str = "job"
) -> ReviewItem:
    return review_item_create(
        policy=policy,
        reason="held for the test",
        target_type=target_type,
        target_id=target_id,
        original_text=text,
        user_id=None,
    )
