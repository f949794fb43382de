"""Datasets on disk to records, images, splits and batches."""

from smse.data.records import ClassMap, Record

__all__ = ["ClassMap", "Record"]
