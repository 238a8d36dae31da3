"""Knowledge bases: parsing, chunking, ingestion and retrieval of documents."""
