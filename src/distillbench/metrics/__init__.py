"""Sample-quality metrics: extractors, FID/IS/KID, precision/recall, cached real statistics, the suite."""

from distillbench.metrics.extractors import (
    ClassifierFeatures,
    ClassifierLogits,
    FeatureExtractor,
    IdentityFeatures,
    InceptionFeatures,
    inception_weights_path,
    load_classifier,
)
from distillbench.metrics.frechet import FID, frechet_distance, gaussian_stats
from distillbench.metrics.precision_recall import precision_recall
from distillbench.metrics.suite import (
    PROTOCOL,
    MetricSuite,
    RealStats,
    cached_real_stats,
    extract,
    format_count,
    metric_name,
    protocol_text,
)

__all__ = [
    "FID",
    "PROTOCOL",
    "ClassifierFeatures",
    "ClassifierLogits",
    "FeatureExtractor",
    "IdentityFeatures",
    "InceptionFeatures",
    "MetricSuite",
    "RealStats",
    "cached_real_stats",
    "extract",
    "format_count",
    "frechet_distance",
    "gaussian_stats",
    "inception_weights_path",
    "load_classifier",
    "metric_name",
    "precision_recall",
    "protocol_text",
]
