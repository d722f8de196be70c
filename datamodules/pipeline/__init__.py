"""The offline data pipeline: DeepMind's TFRecords (downloaded or generated) -> HDF5 files.

Run before training (``dti-sprites-data``, or a DataModule's ``prepare_data`` with ``download``
or ``generate``); the DataModules in :mod:`dti_sprites.datamodules` only read its output.

- ``tfrecord``     TFRecord container reader: record framing, CRC-32C checks, GZIP / ZLIB
- ``tf_example``   ``tf.train.Example`` codec (decoder and encoder), without TensorFlow
- ``decode``       a parsed record checked against its catalog schema; masks and entity classes
- ``synth``        generated records in DeepMind's encoding, and the TFRecord writer
- ``download``     resumable, checksummed download of the public TFRecords, then conversion
- ``convert``      TFRecord -> HDF5 with the dataset's protocol (CLEVR6 filter, crop, resize)
- ``hdf5_writer``  ``HDF5Writer``: the one appendable, atomic writer of the HDF5 files (dataset
                   files here, prediction files for ``dti-sprites predict`` and
                   ``dti-sprites-decompose``)
- ``cli``          the ``dti-sprites-data`` command (convert, synth, download)
"""
