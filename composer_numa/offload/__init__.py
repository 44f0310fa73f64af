"""Offloading CPU work next to the rank's memory: node-local tensors (:mod:`.memory`),
``NumaAdamW`` (:mod:`.optim`) and ``NumaExperts`` (:mod:`.experts`), over the C++
extension ``composer_numa._C`` loaded by :mod:`.native`."""
