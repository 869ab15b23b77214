"""How much do the cached images' trivial statistics still say about the label, and which way, under each
preprocessing? For every site: a logistic regression on the cue statistics of ``fl_covid.cues`` (the audit's,
measured on the cached images as the network sees them), its grouped 5-fold cross-validated AUC inside the site,
its AUC when trained on one whole site and applied to the other, and a site classifier's cross-validated AUC.

    python docs/results/loso/cue_transfer.py        (embedded copy in data/, cached at 73 px as configs/default.yaml)
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fl_covid.config import load_config, project_root
from fl_covid.cues import image_statistics
from fl_covid.data import load_site
from fl_covid.preprocess import Preprocessing

SITES = ("site_a_sarscov2", "site_b_covidct")
VARIANTS = {"none": Preprocessing(), "body crop + equalisation": Preprocessing(body_crop=True, equalize=True),
            "lung crop": Preprocessing(lung_crop=True)}


def classifier() -> object:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))


def main() -> None:
    cache = load_config("configs/default.yaml").cache_size
    print("| preprocessing | A within (grouped CV) | B within | A -> B | B -> A | site classifier |")
    print("|---|---|---|---|---|---|")
    for name, prep in VARIANTS.items():
        x, y, groups = {}, {}, {}
        for s in SITES:
            site = load_site(project_root() / "data" / s, cache, prep=prep)
            x[s], y[s], groups[s] = np.nan_to_num(image_statistics(site.images)), site.labels.numpy(), site.groups
        varies = np.all([x[s].std(0) > 0 for s in SITES], axis=0)
        x = {s: v[:, varies] for s, v in x.items()}
        row = []
        for s in SITES:
            p = cross_val_predict(classifier(), x[s], y[s], cv=GroupKFold(5), groups=groups[s],
                                  method="predict_proba")[:, 1]
            row.append(roc_auc_score(y[s], p))
        for a, b in (SITES, SITES[::-1]):
            row.append(roc_auc_score(y[b], classifier().fit(x[a], y[a]).predict_proba(x[b])[:, 1]))
        which = np.r_[np.zeros(len(y[SITES[0]])), np.ones(len(y[SITES[1]]))]
        p = cross_val_predict(classifier(), np.r_[x[SITES[0]], x[SITES[1]]], which, cv=5, method="predict_proba")
        row.append(roc_auc_score(which, p[:, 1]))
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
