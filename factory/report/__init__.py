"""Version report: one self-contained HTML page to judge a dataset version by eye.

The page shows the funnel with its rejection reasons, the score histograms against the
thresholds, the cost per accepted sample, the lineage, and a gallery of sampled quadruplets
beside the rejected candidates nearest the thresholds. Plots (matplotlib, Agg) and images are
inlined as data URIs; the plots are also saved as PNG files next to the page. The page has no
script, loads nothing from outside, and escapes every text (user/assistant texts are LLM output).

Rejected candidates come from the run's per-unit rows (`runs/<run_id>/dialogue/unit-*.parquet`);
a version without them (a union, a re-threshold, a deleted run) shows accepted samples only.

The report's memory does not grow with the run: `summary` folds each unit file (and each index row
group) into fixed-size summaries (histograms on fixed bins, running counts, the nearest misses).
`data` reads the version, `plots` draws it, `gallery` picks and thumbnails the cards, and
`page` renders the HTML and writes it with the plots (`write_report`).
"""

from factory.report.gallery import GALLERY_MAX_SHARDS, GALLERY_SIZE
from factory.report.page import write_report
from factory.report.summary import NEAR_SIZE

__all__ = ["GALLERY_MAX_SHARDS", "GALLERY_SIZE", "NEAR_SIZE", "write_report"]
