"""Recipes: studies made of many ordinary runs plus a report (``medbench transfusion``)."""
