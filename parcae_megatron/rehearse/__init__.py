"""Dress rehearsal of a GPU run on a CPU: ``python -m parcae_megatron.rehearse CONFIG``
(``parcae-rehearse``); see ``__main__`` for the stages."""
