"""The klockwork engine. Imports nothing from LangChain or LangGraph."""
