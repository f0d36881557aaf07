"""The wire of torch.distributed's store in a barrier stage: one signed HTTP request per operation.

With ``train.backend`` ``ddp`` or ``fsdp`` the ranks meet through a key-value store (what torch's
``TCPStore`` would be). Rank 0's Spark task serves it (:class:`lepton_spark.cluster.torchdist.
StoreService`); every rank's child process speaks to it through
:class:`lepton_spark.training.store.GuardedStore`. Both sides sign and check with this module:

- a request is ``POST /OP`` with the store key in ``X-Lepton-Key`` (percent-quoted), a fresh
  random ``X-Lepton-Nonce``, ``X-Lepton-Timeout-Ms`` for the operations that wait, and the raw
  value as the body;
- ``X-Lepton-Sig`` is HMAC-SHA256, with the stage's secret, over the op, key, nonce, timeout and
  the body's sha256: the server refuses a wrong signature and a nonce it has seen (a replay).

Pure standard library: importable by the ranks and by the Spark task.
"""

from __future__ import annotations

import hashlib
import hmac

ENV_ADDRESS = "LEPTON_TORCH_STORE"  # host:port of rank 0's store service, for the children
ENV_SECRET = "LEPTON_TORCH_STORE_SECRET"  # the stage's secret (never logged)

KEY_HEADER = "X-Lepton-Key"
NONCE_HEADER = "X-Lepton-Nonce"
TIMEOUT_HEADER = "X-Lepton-Timeout-Ms"
SIG_HEADER = "X-Lepton-Sig"

# The operations of torch's ``Store`` the ranks use, and ``ready`` (a rank's process group is
# up: once every rank said so, the service closes its port).
OPS = ("set", "get", "add", "cas", "check", "wait", "delete", "num", "ready")
TIMED_OUT = 408  # a get or wait whose keys did not come in time
MAX_BODY_BYTES = 1 << 20  # store values are addresses and small ids: kilobytes
MAX_CONNECTIONS = 256  # a rank holds one per thread that uses the store
IDLE_TIMEOUT_S = 60.0  # a connection silent this long between requests is closed


def signature(secret: str, op: str, key: str, nonce: str, timeout_ms: int, body: bytes) -> str:
    """The request's HMAC-SHA256 (hex) under the stage's secret."""
    message = "\n".join((op, key, nonce, str(timeout_ms), hashlib.sha256(body).hexdigest()))
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def valid(
    secret: str, op: str, key: str, nonce: str, timeout_ms: int, body: bytes, sig: str
) -> bool:
    return hmac.compare_digest(signature(secret, op, key, nonce, timeout_ms, body), sig)
