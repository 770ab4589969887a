"""Expert router: picks a tenant's adapter for a prompt, by keyword rules and then by a
sentence-embedding classifier (all-MiniLM-L6-v2), falling back on the table's default.

Pure: imports nothing of the rest of the gateway. Typical use::

    encoder = await asyncio.to_thread(Encoder)       # loads the model once
    router = Router(encoder)
    decision = await router.route(tenant, ExpertTable.from_dict(raw), prompt)
"""
from .encoder import Encoder
from .errors import EncoderClosed, InvalidExpertTable, RouterError
from .hybrid import Router, RouterConfig
from .keywords import KeywordClassifier
from .neural import CentroidHead, NeuralClassifier
from .types import Classifier, Decision, Expert, ExpertTable, Keyword, SkippedKeyword

__all__ = [
    "CentroidHead", "Classifier", "Decision", "Encoder", "EncoderClosed", "Expert", "ExpertTable",
    "InvalidExpertTable", "Keyword", "KeywordClassifier", "NeuralClassifier", "Router",
    "RouterConfig", "RouterError", "SkippedKeyword",
]
