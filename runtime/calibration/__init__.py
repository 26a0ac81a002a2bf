"""`lineguard calibrate`: per-station thresholds from normal frames (numpy + OpenCV, no torch).

Modules (imported one by one, so `lineguard --help` stays light):

* `fit` — the image threshold: an upper confidence bound of the normal-score (1 − α) quantile;
* `pixel` — the pixel threshold for region extraction;
* `pooled` — stations with too few unseen frames, calibrated together;
* `seen` — which calibration images the model trained on;
* `scoring` — frames through a station's exact pipeline;
* `report`, `histogram` — `calibration.json` and `histogram.png`;
* `apply` — writing a station file or sending `threshold/set`, and rollback (audited);
* `cli`, `actions` — the command line.
"""
