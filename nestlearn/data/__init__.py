"""Data: corpora fetched once from the package registries (`corpora`), tokenizers (`tokenizer`), token shards
(`shards`), and synthetic tasks generated locally (`synthetic`). Nothing is downloaded at run time."""
