from django.urls import path

from chat import views

app_name = "chat"

urlpatterns = [
    path("", views.index, name="index"),
    path("new/", views.conversation_new, name="new"),
    path("<int:conversation_id>/", views.conversation_detail, name="conversation"),
    path("citations/<int:citation_id>/", views.citation_detail, name="citation"),
    path("settings/", views.settings_page, name="settings"),
    path("settings/delete-data/", views.data_delete, name="data_delete"),
]
