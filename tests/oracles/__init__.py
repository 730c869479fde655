"""Independent oracles the analyzer tests compare relprop with.

- :mod:`tests.oracles.formulas`: every LRP rule re-written in float64 from the papers' formulas, on
  explicit per-connection contributions ``z_ij`` (no transposed convolutions, no shortcuts).
- :mod:`tests.oracles.zennit_runner`: Zennit attributions with the same start relevance as relprop.
- :mod:`tests.oracles.captum_runner`: Captum attributions, including NoiseTunnel with given noise.
- :mod:`tests.oracles.nets`: small seeded networks whose identities hold exactly.
"""
