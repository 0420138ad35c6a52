"""Leaderboards: runs aggregated over seeds (:mod:`.aggregate`, :mod:`.axes`), the format (:mod:`.schema`),
significance against the best, the regression gate (:mod:`.compare`), rendering (:mod:`.render`,
:mod:`.plots`) and the papers' published rows (:mod:`.published`)."""
