"""Experiments on top of the library and the Flower glue: the protocol runner (folds x seeds), the comparison
report, evaluation at unseen hospitals, Grad-CAM, reuse of trained run directories, and the helpers that run
Flower federations (a local ``flwr run`` or the same ServerApp and ClientApps in one process).

Layering: the library (``fl_covid``) imports neither Flower (except ``fl_covid.records``) nor the glue;
``clients/`` and ``server/`` import the library; this package may import all of them.
"""
