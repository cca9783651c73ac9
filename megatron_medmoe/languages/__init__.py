"""Language codes, families and experts, read from data tables."""
from .registry import Language, LanguageRegistry, LanguageTableError, load_registry

__all__ = ["Language", "LanguageRegistry", "LanguageTableError", "load_registry"]
