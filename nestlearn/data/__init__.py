"""Data: corpora by name or path (`corpora`): pinned ones fetched once from the package registries (`registry`,
`download`) and the user's own text (`local`), all stored as split files (`store`); tokenizers (`tokenizer`), token
shards (`shards`), and synthetic tasks generated locally (`synthetic`). Nothing is downloaded at run time."""
