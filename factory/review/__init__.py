"""Human review of a version in Label Studio (paper section 3.2: people checked the filtered candidates).

`export` sends a version's samples (and a seeded sample of near-threshold rejections) to a new
Label Studio project; `publish` reads the votes back and publishes a `reviewed` version of the kept
samples with the review's figures; `verdicts` computes those figures (agreement, the filter's
precision and estimated recall); `studio` is the only module that talks to Label Studio.
"""
