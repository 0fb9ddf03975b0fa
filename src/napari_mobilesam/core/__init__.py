"""The slice core: a stack seen as slices (:class:`~.source.SliceSource`), their embeddings
(:class:`~.embeddings.EmbeddingCache`), prompts to masks (:class:`~.predictor.SlicePredictor`),
and the one place that wires them from a model choice (:class:`~.session.Session`)."""
