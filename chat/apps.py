from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"

    def ready(self) -> None:
        from chat import review
        from governance.review_targets import review_decided, review_target_register

        review_target_register(review.TARGET, review.MessageReviewTarget())
        review_decided.connect(review.review_decision_apply, dispatch_uid="chat.review.apply")

        from models_admin.comparison import version_outcomes_register

        version_outcomes_register("chat", review.version_outcomes)

        from chat.api import review as job_review

        review_target_register(job_review.TARGET, job_review.JobReviewTarget())
        review_decided.connect(
            job_review.job_review_decision_apply, dispatch_uid="chat.api.review.apply"
        )
