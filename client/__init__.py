"""Python client for the reward service. Imports neither torch nor the service.

>>> from client import RewardClient
>>> with RewardClient("http://127.0.0.1:8000") as rm:
...     rm.score([{"prompt": "2+2?", "response": "4"}]).scores
"""

from .client import AsyncRewardClient, RewardClient, RewardServiceError, ServiceUnavailable, served_card
from .protocol import (
    API_VERSION,
    ComparePair,
    CompareRequest,
    CompareResponse,
    CompareResult,
    ClassificationRequest,
    ClassificationResponse,
    ErrorDetail,
    ErrorResponse,
    GetRewardRequest,
    GetRewardResponse,
    Message,
    MessagesItem,
    ModelCard,
    ModelList,
    PoolingRequest,
    PoolingResponse,
    PromptResponseItem,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    Usage,
    as_item,
)

__all__ = [
    "RewardClient",
    "AsyncRewardClient",
    "RewardServiceError",
    "ServiceUnavailable",
    "API_VERSION",
    "Message",
    "PromptResponseItem",
    "MessagesItem",
    "ScoreItem",
    "ScoreRequest",
    "ScoreResponse",
    "Usage",
    "ComparePair",
    "CompareRequest",
    "CompareResult",
    "CompareResponse",
    "ModelCard",
    "ModelList",
    "ErrorDetail",
    "ErrorResponse",
    "GetRewardRequest",
    "GetRewardResponse",
    "ClassificationRequest",
    "ClassificationResponse",
    "PoolingRequest",
    "PoolingResponse",
    "as_item",
]
