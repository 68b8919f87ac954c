"""The deltafs benchmark: deltafs against DeltaGlider, s3fs-fuse, rclone mount and a local
directory, side by side on one moto S3 server. Run it with ``scripts/bench``; see
``docs/performance.md``. Independent of the deltafs package: it drives every system
through its command line, as a user would."""
