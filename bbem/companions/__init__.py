"""Companion tasks on the same BB core: speech recognition (:mod:`.asr`) and face
identification (:mod:`.faceid`).

They import :mod:`bbem.bb` and the generic run-directory helpers, never the EM code, which
keeps the core honest: if BB works here unchanged, it is not a U-Net special case.
"""
