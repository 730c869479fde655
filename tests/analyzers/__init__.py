"""Analyzer tests: oracles (Zennit, Captum, float64 formulas), identities, errors, model state."""
