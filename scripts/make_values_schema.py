"""Builds helm/stream-trainer/values.schema.json; config subtree from Settings' own schema."""

import copy
import json
import sys

from stream_trainer.config import Settings

# Set by the chart from `secrets` (or forbidden: secret values never go into values).
CHART_OWNED = {
    "KafkaSettings": [
        "sasl_password",
        "sasl_password_file",
        "ssl_ca_location",
        "ssl_certificate_location",
        "ssl_key_location",
    ],
    "CheckpointSettings": ["hmac_key", "hmac_key_file"],
    # The password comes from a Secret through `env` (valueFrom secretKeyRef), never values.
    "SchemaRegistrySettings": ["basic_auth_password"],
    # Set from `search.jobs` (which also renders the Job template, its mounts and the RBAC).
    "SearchJobsSettings": ["enabled", "parallelism", "snapshot_dir", "job_template"],
    # MLflow credentials: env from a Secret (extraEnv valueFrom secretKeyRef) or a mounted
    # file (token_file / password_file), never values.
    "MlflowSettings": ["token", "password"],
}

raw = Settings.model_json_schema()
defs = raw["$defs"]
for model, fields in CHART_OWNED.items():
    for f in fields:
        defs[model]["properties"].pop(f)


def clean(node):
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].split("/")[-1]
            out = clean(copy.deepcopy(defs[name]))
            return out
        return {k: clean(v) for k, v in node.items() if k not in ("title", "writeOnly")}
    if isinstance(node, list):
        return [clean(v) for v in node]
    return node


config = clean({k: v for k, v in raw.items() if k != "$defs"})
config["description"] = (
    "The service's config file, mirrored from stream_trainer.config.Settings "
    "(secret fields and mounted-secret paths are set by the chart from `secrets`)."
)
http = config["properties"]["http"]
http["properties"]["enabled"] = {
    "const": True,
    "description": "must stay true: the chart's probes, Service and ServiceMonitor use the HTTP port",
}
config["properties"]["training"]["properties"]["mode"]["description"] = (
    "training mode, chosen once: per_record, mini_batch or full_batch"
)

S = lambda **kw: kw
string = {"type": "string"}
labels = {"type": "object", "additionalProperties": {"type": "string"}}
annotations = labels
anyobj = {"type": "object"}
anylist = {"type": "array", "items": {"type": "object"}}
probe = lambda d: {
    "type": "object",
    "additionalProperties": False,
    "description": d,
    "required": ["enabled", "periodSeconds", "failureThreshold", "timeoutSeconds"],
    "properties": {
        "enabled": {"type": "boolean"},
        "periodSeconds": {"type": "integer", "minimum": 1},
        "failureThreshold": {"type": "integer", "minimum": 1},
        "timeoutSeconds": {"type": "integer", "minimum": 1},
    },
}


def obj(props, required=None, description=None, additional=False):
    o = {"type": "object", "additionalProperties": additional, "properties": props}
    o["required"] = sorted(props) if required is None else required
    if description:
        o["description"] = description
    return o


secret_ref = lambda d, as_enum: obj(
    {
        "existingSecret": {
            "type": "string",
            "description": "name of an existing Secret in the release namespace",
        },
        "key": {"type": "string", "minLength": 1, "description": "key inside the Secret"},
        "as": {
            "enum": as_enum,
            "description": "deliver as a mounted file or an environment variable",
        },
    },
    description=d,
)

schema = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "stream-trainer chart values",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "replicaCount",
        "workload",
        "image",
        "persistence",
        "service",
        "secrets",
        "config",
    ],
    "properties": {
        "global": {
            "type": "object",
            "description": "Helm global values (passed through by parent charts)",
        },
        "nameOverride": string,
        "fullnameOverride": string,
        "replicaCount": {
            "type": "integer",
            "minimum": 0,
            "description": "1 (running) or 0 (paused); 2 or more need config.checkpoint.dir and config.registry.root both on an object store (the chart fails to render otherwise): hot standbys with config.model.scope global, members sharing the partitions with scope partition. Ignored when autoscaling is on.",
        },
        "autoscaling": obj(
            {
                "partitions": {
                    "type": ["integer", "null"],
                    "minimum": 1,
                    "description": "input partitions (all input topics): required with keda or hpa, whose maximum may not exceed it",
                },
                "scaleDownStabilizationWindowSeconds": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": 3600,
                    "description": "seconds the lag must stay low before members are removed",
                },
                "keda": obj(
                    {
                        "enabled": {"type": "boolean"},
                        "minReplicaCount": {"type": "integer", "minimum": 0},
                        "maxReplicaCount": {"type": ["integer", "null"], "minimum": 1},
                        "lagThreshold": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "target lag per member (records, committed offsets)",
                        },
                        "activationLagThreshold": {"type": "integer", "minimum": 0},
                        "pollingInterval": {"type": "integer", "minimum": 1},
                    },
                    # maxReplicaCount: null is dropped by Helm's merge, so it is never required.
                    required=[
                        "enabled",
                        "minReplicaCount",
                        "lagThreshold",
                        "activationLagThreshold",
                        "pollingInterval",
                    ],
                    description="a KEDA ScaledObject with the kafka trigger (needs KEDA's CRDs)",
                ),
                "hpa": obj(
                    {
                        "enabled": {"type": "boolean"},
                        # HPA refuses 0 unless the cluster enables HPAScaleToZero.
                        "minReplicas": {"type": "integer", "minimum": 1},
                        "maxReplicas": {"type": ["integer", "null"], "minimum": 1},
                        "targetAverageValue": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "target lag per member (records)",
                        },
                        "metricSelector": labels,
                    },
                    required=["enabled", "minReplicas", "targetAverageValue", "metricSelector"],
                    description="an autoscaling/v2 HPA on the External metric stream_trainer_consumer_lag_records (prometheus-adapter)",
                ),
            },
            required=["scaleDownStabilizationWindowSeconds", "keda", "hpa"],
            description="members that follow the lag: model.scope partition, both stores remote; keda and hpa are mutually exclusive (the chart fails to render otherwise)",
        ),
        "standby": obj(
            {
                "spreadAcrossNodes": {
                    "type": "boolean",
                    "description": "with replicaCount > 1 and no topologySpreadConstraints: one pod per node",
                }
            }
        ),
        "podDisruptionBudget": obj(
            {
                "enabled": {
                    "type": "boolean",
                    "description": "render a PodDisruptionBudget when replicaCount > 1",
                },
                "maxUnavailable": {
                    "type": ["integer", "string"],
                    "minimum": 0,
                    "pattern": "^[0-9]+%$",
                    "description": "pods a voluntary disruption may take at once",
                },
                "minAvailable": {
                    "type": ["integer", "string", "null"],
                    "minimum": 0,
                    "pattern": "^[0-9]+%$",
                    "description": "used instead of maxUnavailable when set",
                },
            },
            # minAvailable: null is dropped by Helm's merge, so it is never required.
            required=["enabled", "maxUnavailable"],
        ),
        "workload": obj(
            {
                "kind": {
                    "enum": ["Deployment", "StatefulSet"],
                    "description": "Deployment (strategy Recreate) or StatefulSet",
                }
            }
        ),
        "image": obj(
            {
                "repository": {"type": "string", "minLength": 1},
                "tag": string,
                "digest": {"type": "string", "pattern": "^(sha256:[a-f0-9]{64})?$"},
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            }
        ),
        "imagePullSecrets": {
            "type": "array",
            "items": obj({"name": {"type": "string", "minLength": 1}}),
        },
        "serviceAccount": obj(
            {"create": {"type": "boolean"}, "name": string, "annotations": annotations}
        ),
        "commonLabels": labels,
        "podAnnotations": annotations,
        "podLabels": labels,
        "podSecurityContext": anyobj,
        "securityContext": anyobj,
        "resources": obj({"requests": anyobj, "limits": anyobj}, required=[]),
        "tmpSizeLimit": {"type": "string", "pattern": "^[0-9]+(Ki|Mi|Gi)?$"},
        "terminationGracePeriodSeconds": {
            "type": ["integer", "null"],
            "minimum": 1,
            "description": "empty = ceil(config.shutdown.timeout_s) + terminationGraceMarginSeconds; when set it must exceed config.shutdown.timeout_s",
        },
        "terminationGraceMarginSeconds": {"type": "integer", "minimum": 1},
        "probes": obj(
            {
                "startup": probe("GET /healthz until the service has started"),
                "liveness": probe("GET /healthz"),
                "readiness": probe("GET /readyz"),
            }
        ),
        "persistence": obj(
            {
                "enabled": {"type": "boolean"},
                "existingClaim": string,
                "storageClass": string,
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": ["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]},
                },
                "size": {
                    "type": "string",
                    "pattern": "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|K|M|G|T|P)?$",
                },
                "annotations": annotations,
                "retainOnUninstall": {"type": "boolean"},
                "mountPath": {"type": "string", "pattern": "^/"},
            }
        ),
        "service": obj(
            {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "annotations": annotations,
            }
        ),
        "secrets": obj(
            {
                "checkpointKey": secret_ref(
                    "checkpoint HMAC key (required unless config.checkpoint.allow_unsigned)",
                    ["file", "env"],
                ),
                "kafkaSasl": secret_ref(
                    "Kafka SASL password (required for SASL_* security protocols)", ["env", "file"]
                ),
                "kafkaTls": obj(
                    {
                        "existingSecret": string,
                        "caKey": string,
                        "certKey": string,
                        "keyKey": string,
                    },
                    description="Kafka TLS material, mounted as files",
                ),
                "objectStore": obj(
                    {
                        "existingSecret": string,
                        "accessKeyIdKey": {"type": "string", "minLength": 1},
                        "secretAccessKeyKey": {"type": "string", "minLength": 1},
                    },
                    description="S3 keys for an s3:// registry, delivered as AWS_* env",
                ),
            }
        ),
        "extraEnv": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1}},
                "if": {
                    "properties": {
                        "name": {
                            "enum": [
                                "STREAM_TRAINER_KAFKA__SASL_PASSWORD",
                                "STREAM_TRAINER_CHECKPOINT__HMAC_KEY",
                            ]
                        }
                    }
                },
                "then": {"properties": {"value": False}, "required": ["valueFrom"]},
                "description": "extra env vars; secret variables must use valueFrom, never a literal value",
            },
        },
        "nodeSelector": labels,
        "tolerations": anylist,
        "affinity": anyobj,
        "topologySpreadConstraints": anylist,
        "priorityClassName": string,
        "metrics": obj(
            {
                "serviceMonitor": obj(
                    {
                        "enabled": {"type": "boolean"},
                        "interval": string,
                        "scrapeTimeout": string,
                        "labels": labels,
                    }
                ),
                "prometheusRule": obj(
                    {
                        "enabled": {"type": "boolean"},
                        "labels": labels,
                        "runbookBaseUrl": {"type": "string", "pattern": "^https?://[^#]+$"},
                    }
                ),
                "grafanaDashboard": obj(
                    {
                        "enabled": {"type": "boolean"},
                        "labelKey": {"type": "string", "minLength": 1},
                        "labelValue": string,
                        "annotations": annotations,
                    }
                ),
            }
        ),
        "networkPolicy": obj(
            {
                "enabled": {"type": "boolean"},
                "ingressFrom": anylist,
                "kafkaEgressTo": anylist,
                "kafkaPorts": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1, "maximum": 65535},
                },
                "extraEgress": anylist,
            }
        ),
        "helmTest": obj({"enabled": {"type": "boolean"}}),
        "search": obj(
            {
                "jobs": obj(
                    {
                        "enabled": {"type": "boolean"},
                        "parallelism": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "databaseUrl": obj(
                            {
                                "existingSecret": {
                                    "type": "string",
                                    "description": "name of an existing Secret holding the study database URL",
                                },
                                "key": {"type": "string", "minLength": 1},
                            }
                        ),
                        "snapshots": obj(
                            {
                                "existingClaim": {
                                    "type": "string",
                                    "description": "a ReadWriteMany claim shared by the service and the Job pods",
                                },
                                "mountPath": {"type": "string", "pattern": "^/"},
                            }
                        ),
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "resources": obj({"requests": anyobj, "limits": anyobj}, required=[]),
                    },
                    description="search trials as a Kubernetes Indexed Job (docs/search.md)",
                )
            }
        ),
        "config": config,
    },
    "allOf": [
        {
            "if": {
                "properties": {
                    "config": {
                        "properties": {
                            "checkpoint": {
                                "properties": {"allow_unsigned": {"const": True}},
                                "required": ["allow_unsigned"],
                            }
                        }
                    }
                }
            },
            "else": {
                "properties": {
                    "secrets": {
                        "properties": {
                            "checkpointKey": {"properties": {"existingSecret": {"minLength": 1}}}
                        }
                    }
                }
            },
        },
        {
            "if": {
                "properties": {
                    "config": {
                        "properties": {
                            "kafka": {
                                "properties": {
                                    "security_protocol": {"enum": ["SASL_PLAINTEXT", "SASL_SSL"]}
                                },
                                "required": ["security_protocol"],
                            }
                        }
                    }
                }
            },
            "then": {
                "properties": {
                    "secrets": {
                        "properties": {
                            "kafkaSasl": {"properties": {"existingSecret": {"minLength": 1}}}
                        }
                    }
                }
            },
        },
    ],
}
json.dump(schema, sys.stdout, indent=2)
print()
