"""Companion tasks on the same BB core: speech recognition (:mod:`.asr`) and face
identification (:mod:`.faceid`).

Each is a :class:`bbem.engine.Task` trained by :func:`bbem.engine.fit`, the loop the EM
training uses. They import :mod:`bbem.bb`, the engine and the generic run-directory helpers,
never the EM code, which keeps the core honest: if BB works here unchanged, it is not a U-Net
special case (``tests/test_engine.py`` checks the imports).
"""
