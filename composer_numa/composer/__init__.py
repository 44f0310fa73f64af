"""Integrating with MosaicML Composer: the :class:`~composer_numa.composer.callback.NumaAffinity`
callback and the one function that reads Composer's launcher. The only modules that import composer."""
