from models_admin.models import Deployment, ModelVersion


class DeploymentUnavailable(Exception):
    """No servable version behind an alias; the message says what an operator must fix."""


def deployment_resolve(*, alias: str) -> Deployment:
    deployment = (
        Deployment.objects.select_related("primary_version__model").filter(alias=alias).first()
    )
    if deployment is None:
        raise DeploymentUnavailable(f"No deployment named '{alias}' exists.")
    if not deployment.is_active:
        raise DeploymentUnavailable(f"The deployment '{alias}' is switched off.")
    if deployment.primary_version.stage == ModelVersion.Stage.ARCHIVED:
        raise DeploymentUnavailable(f"The version behind '{alias}' is archived.")
    return deployment
