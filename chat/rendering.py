from dataclasses import dataclass

import nh3
from django.template.loader import render_to_string
from django.utils.html import escape, linebreaks
from markdown_it import MarkdownIt

from chat.knowledge.citations import citations_link
from chat.models import Message
from governance.budgets import BudgetMeter

# Raw HTML in the model's output is shown as text, never interpreted; nh3 then removes anything
# unsafe that Markdown itself could produce (javascript: links and the like).
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def markdown_render(text: str) -> str:
    return nh3.clean(_markdown.render(text), link_rel="noopener noreferrer nofollow")


@dataclass(frozen=True)
class CitationView:
    number: int
    pk: int
    document_name: str


@dataclass(frozen=True)
class MessageView:
    """What the page shows of a message; built from a row, or from a stream event."""

    pk: int
    role: str
    status: str
    html: str
    error: str = ""
    completion_tokens: int | None = None
    time_to_first_token_ms: float | None = None
    tokens_per_second: float | None = None
    citations: tuple[CitationView, ...] = ()

    @property
    def is_active(self) -> bool:
        return self.status in (Message.Status.PENDING, Message.Status.STREAMING)

    @classmethod
    def of(cls, message: Message) -> "MessageView":
        citations: tuple[CitationView, ...] = ()
        if message.role == Message.Role.USER:
            html = linebreaks(escape(message.content))
        elif message.status in (Message.Status.BLOCKED, Message.Status.HELD):
            # A stopped or held answer is replaced by its notice; the text is not shown.
            html = ""
        else:
            # Prefetched by the selectors that list messages.
            citations = tuple(
                CitationView(number=c.number, pk=c.pk, document_name=c.document_name)
                for c in message.citations.all()
            )
            html = citations_link(
                markdown_render(message.content), [(c.number, c.pk) for c in citations]
            )
        return cls(
            pk=message.pk,
            role=message.role,
            status=message.status,
            html=html,
            error=message.error,
            completion_tokens=message.completion_tokens,
            time_to_first_token_ms=message.time_to_first_token_ms,
            tokens_per_second=message.tokens_per_second,
            citations=citations,
        )

    @classmethod
    def streaming(cls, message_id: int, text: str) -> "MessageView":
        return cls(
            pk=message_id,
            role=Message.Role.ASSISTANT,
            status=Message.Status.STREAMING,
            html=markdown_render(text),
        )


def message_fragment(view: MessageView, *, swap: str = "") -> str:
    """One message as HTML; `swap` makes it an htmx out-of-band swap for the websocket."""
    return render_to_string("chat/_message.html", {"m": view, "swap": swap})


def notice_fragment(text: str, *, level: str = "error") -> str:
    return render_to_string("chat/_notice.html", {"text": text, "level": level})


def quota_fragment(meters: list[BudgetMeter]) -> str:
    """The quota meter, swapped into the page out of band after each change."""
    return render_to_string("chat/_quota.html", {"meters": meters, "oob": True})
