from django.urls import path

from chat import review_views

app_name = "review"

urlpatterns = [
    path("", review_views.queue, name="queue"),
    path("claim/", review_views.claim_next, name="claim"),
    path("<int:item_id>/", review_views.item_detail, name="item"),
    path("<int:item_id>/decide/", review_views.item_decide, name="decide"),
    path("<int:item_id>/renew/", review_views.item_renew, name="renew"),
    path("<int:item_id>/release/", review_views.item_release, name="release"),
]
