import itertools
from importlib import import_module

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth.models import User

_counter = itertools.count(1)
PASSWORD = "correct-horse-battery-staple"


def user_create(*, username: str | None = None, is_staff: bool = False) -> User:
    return User.objects.create_user(
        username=username or f"user{next(_counter)}", password=PASSWORD, is_staff=is_staff
    )


def session_cookie_for(user: User) -> str:
    """A real login session for `user`, as the browser would carry it in its cookie."""
    store = import_module(settings.SESSION_ENGINE).SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.save()
    return f"{settings.SESSION_COOKIE_NAME}={store.session_key}"
