"""The library's logger and its once-per-process notices (fallbacks a user should know about)."""

import logging

logger = logging.getLogger("dora_jax")
_said: set[str] = set()


def say_once(key: str, message: str) -> None:
  """Logs ``"dora_jax: " + message`` as a warning the first time ``key`` is seen in this process."""
  if key not in _said:
    _said.add(key)
    logger.warning("dora_jax: %s", message)
