"""The framework a stage is written against: config, storage and its layout, keys, the stage base and
its executor, unit files, images and model loading."""
