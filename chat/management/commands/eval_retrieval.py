from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from chat.knowledge.evaluation import corpus_ingest, retrieval_evaluate
from chat.models import Chunk

DEFAULT_CORPUS = Path(settings.BASE_DIR) / "bench" / "corpus"


class Command(BaseCommand):
    help = "Recall@5, recall@10 and MRR of vector, full-text and hybrid search on a labeled set."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS / "docs")
        parser.add_argument("--questions", type=Path, default=DEFAULT_CORPUS / "questions.json")
        parser.add_argument("--chunk-tokens", type=int, default=64)
        parser.add_argument("--overlap-tokens", type=int, default=16)
        parser.add_argument("--output", type=Path, help="also write the table to this file")
        parser.add_argument("--keep", action="store_true", help="keep the knowledge base")

    def handle(self, *args: object, **options: object) -> None:
        kb = corpus_ingest(
            corpus_dir=options["corpus"],  # type: ignore[arg-type]
            name="eval: retrieval corpus",
            chunk_tokens=options["chunk_tokens"],  # type: ignore[arg-type]
            overlap_tokens=options["overlap_tokens"],  # type: ignore[arg-type]
        )
        try:
            scores = retrieval_evaluate(kb=kb, questions_path=options["questions"])  # type: ignore[arg-type]
            chunks = Chunk.objects.filter(knowledge_base=kb).count()
            documents = kb.documents.count()
        finally:
            if not options["keep"]:
                kb.delete()
        lines = [
            f"{documents} documents, {chunks} chunks of {options['chunk_tokens']} tokens "
            f"(overlap {options['overlap_tokens']}); {scores[0].questions} questions",
            "",
            "| mode | recall@5 | recall@10 | MRR |",
            "| --- | ---: | ---: | ---: |",
            *(
                f"| {s.mode} | {s.recall_at_5:.3f} | {s.recall_at_10:.3f} | {s.mrr:.3f} |"
                for s in scores
            ),
        ]
        table = "\n".join(lines)
        self.stdout.write(table)
        if options["output"]:
            Path(options["output"]).write_text(table + "\n")  # type: ignore[arg-type]
