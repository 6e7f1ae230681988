"""Integrations of the klockwork engine with agent frameworks.

* :mod:`klockwork.integrations.langchain` — ``@klock_protected``, tool
  wrappers (``protect_tool``/``protect_tools``) and ``agent_config``.

The engine (:mod:`klockwork.core`) never imports from here; integrations
only call the engine's public API.
"""
