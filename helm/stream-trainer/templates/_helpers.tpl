{{/*
Chart name, truncated to the 63 characters Kubernetes allows in a label.
*/}}
{{- define "stream-trainer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<chart>, or the release name when it already holds
the chart name; truncated to 63 characters (DNS-1123 label limit).
*/}}
{{- define "stream-trainer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "stream-trainer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels on every object.
*/}}
{{- define "stream-trainer.labels" -}}
helm.sh/chart: {{ include "stream-trainer.chart" . }}
{{ include "stream-trainer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stream-trainer
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: stable across upgrades (never include the version).
*/}}
{{- define "stream-trainer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stream-trainer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "stream-trainer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stream-trainer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: digest wins over tag; the tag defaults to the appVersion.
*/}}
{{- define "stream-trainer.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Where mounted secrets live inside the container. */}}
{{- define "stream-trainer.checkpointKeyDir" -}}/etc/stream-trainer/secrets/checkpoint{{- end }}
{{- define "stream-trainer.saslDir" -}}/etc/stream-trainer/secrets/kafka-sasl{{- end }}
{{- define "stream-trainer.tlsDir" -}}/etc/stream-trainer/secrets/kafka-tls{{- end }}

{{/*
Whether the checkpoint key Secret is used (config.checkpoint.allow_unsigned may waive it).
*/}}
{{- define "stream-trainer.useCheckpointKey" -}}
{{- if .Values.secrets.checkpointKey.existingSecret }}true{{- end }}
{{- end }}

{{/*
Whether SASL is configured.
*/}}
{{- define "stream-trainer.useSasl" -}}
{{- if hasPrefix "SASL" (.Values.config.kafka.security_protocol | default "PLAINTEXT") }}true{{- end }}
{{- end }}

{{/*
The service's config file: .Values.config plus the paths of secrets mounted as files.
Secret VALUES never appear here; they arrive as files or as env vars from secretKeyRef.
Cross-field rules the schema cannot express fail the render with a clear message.
*/}}
{{- define "stream-trainer.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $kafka := $cfg.kafka }}
{{- $checkpoint := $cfg.checkpoint }}
{{- $ck := .Values.secrets.checkpointKey }}
{{- if and (not $ck.existingSecret) (not $checkpoint.allow_unsigned) }}
{{- fail "secrets.checkpointKey.existingSecret is required (or set config.checkpoint.allow_unsigned: true, not for production)" }}
{{- end }}
{{- if and $ck.existingSecret (eq $ck.as "file") }}
{{- $_ := set $checkpoint "hmac_key_file" (printf "%s/%s" (include "stream-trainer.checkpointKeyDir" .) $ck.key) }}
{{- end }}
{{- if include "stream-trainer.useSasl" . }}
{{- $sasl := .Values.secrets.kafkaSasl }}
{{- if not $sasl.existingSecret }}
{{- fail (printf "config.kafka.security_protocol %s needs secrets.kafkaSasl.existingSecret (the SASL password Secret)" $kafka.security_protocol) }}
{{- end }}
{{- if eq $sasl.as "file" }}
{{- $_ := set $kafka "sasl_password_file" (printf "%s/%s" (include "stream-trainer.saslDir" .) $sasl.key) }}
{{- end }}
{{- end }}
{{- $tls := .Values.secrets.kafkaTls }}
{{- if $tls.existingSecret }}
{{- if $tls.caKey }}
{{- $_ := set $kafka "ssl_ca_location" (printf "%s/%s" (include "stream-trainer.tlsDir" .) $tls.caKey) }}
{{- end }}
{{- if $tls.certKey }}
{{- $_ := set $kafka "ssl_certificate_location" (printf "%s/%s" (include "stream-trainer.tlsDir" .) $tls.certKey) }}
{{- end }}
{{- if $tls.keyKey }}
{{- $_ := set $kafka "ssl_key_location" (printf "%s/%s" (include "stream-trainer.tlsDir" .) $tls.keyKey) }}
{{- end }}
{{- end }}
{{- $mount := trimSuffix "/" .Values.persistence.mountPath }}
{{- range $field, $path := dict "checkpoint.dir" $checkpoint.dir "registry.root" $cfg.registry.root }}
{{- /* An object-store location is not on the pod's filesystem. */ -}}
{{- if and (not (include "stream-trainer.isStoreUrl" $path)) (not (hasPrefix (printf "%s/" $mount) (toString $path))) }}
{{- fail (printf "config.%s (%s) must be below persistence.mountPath (%s): the root filesystem is read-only" $field $path $mount) }}
{{- end }}
{{- end }}
{{- $jobs := .Values.search.jobs }}
{{- $training := $cfg.training }}
{{- $fullBatch := get $training "full_batch" | default dict }}
{{- $search := get $fullBatch "search" | default dict }}
{{- $jobsCfg := get $search "jobs" | default dict }}
{{- if $jobs.enabled }}
{{- if not $jobs.databaseUrl.existingSecret }}
{{- fail "search.jobs.databaseUrl.existingSecret is required when search.jobs.enabled (the study database URL Secret)" }}
{{- end }}
{{- if not $jobs.snapshots.existingClaim }}
{{- fail "search.jobs.snapshots.existingClaim is required when search.jobs.enabled (a ReadWriteMany claim the service and the Job pods share)" }}
{{- end }}
{{- if not (and (eq (toString $training.mode) "full_batch") $search.enabled) }}
{{- fail "search.jobs.enabled needs config.training.mode full_batch and config.training.full_batch.search.enabled" }}
{{- end }}
{{- $_ := set $jobsCfg "enabled" true }}
{{- $_ := set $jobsCfg "parallelism" $jobs.parallelism }}
{{- $_ := set $jobsCfg "snapshot_dir" $jobs.snapshots.mountPath }}
{{- $_ := set $jobsCfg "job_template" (include "stream-trainer.searchJobTemplatePath" .) }}
{{- $_ := set $search "jobs" $jobsCfg }}
{{- $_ := set $fullBatch "search" $search }}
{{- $_ := set $training "full_batch" $fullBatch }}
{{- else if $jobsCfg.enabled }}
{{- fail "config.training.full_batch.search.jobs.enabled is set by the chart: use search.jobs.enabled (it also renders the Job template and the RBAC)" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
terminationGracePeriodSeconds: above the service's own shutdown bound.
*/}}
{{- define "stream-trainer.terminationGracePeriodSeconds" -}}
{{- $bound := 25.0 }}
{{- with .Values.config.shutdown }}{{- with .timeout_s }}{{- $bound = float64 . }}{{- end }}{{- end }}
{{- $set := .Values.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $set }}
{{- add (ceil $bound | int) .Values.terminationGraceMarginSeconds }}
{{- else }}
{{- if le (float64 $set) $bound }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.shutdown.timeout_s (%v): Kubernetes would kill the pod before its final checkpoint" $set $bound) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}

{{/*
storageClassName of a created claim: "" = cluster default (omitted), "-" = no class.
*/}}
{{- define "stream-trainer.storageClass" -}}
{{- $class := .Values.persistence.storageClass }}
{{- if eq $class "-" }}
storageClassName: ""
{{- else if $class }}
storageClassName: {{ $class | quote }}
{{- end }}
{{- end }}

{{/*
"true" when the location is an object-store URL (s3://, gs://, az://), else empty.
*/}}
{{- define "stream-trainer.isStoreUrl" -}}
{{- if regexMatch "^(s3|gs|az)://" (toString .) }}true{{- end }}
{{- end }}

{{/*
"true" when the pod needs the data volume: unless both config.registry.root and
config.checkpoint.dir are object-store URLs (then nothing is kept on the pod's disk, no
claim is created and the pod can start on any node at once).
*/}}
{{- define "stream-trainer.needsDataVolume" -}}
{{- $cfg := .Values.config }}
{{- if not (and (include "stream-trainer.isStoreUrl" $cfg.registry.root) (include "stream-trainer.isStoreUrl" $cfg.checkpoint.dir)) }}true{{- end }}
{{- end }}

{{/*
config.model.scope: "global" (one model, one writer) or "partition" (one model per input
partition, members share the partitions the group assigns them).
*/}}
{{- define "stream-trainer.scope" -}}
{{- $model := .Values.config.model | default dict }}
{{- get $model "scope" | default "global" }}
{{- end }}

{{/*
The autoscaler the values ask for: "keda", "hpa" or empty. Every rule an autoscaled release
must meet fails the render here, with the reason:
- not both (two autoscalers would fight over the workload's replicas);
- model.scope partition (with global scope one pod trains and the others stand by: more
  pods add no throughput);
- both stores on an object store (a pod with a volume cannot come and go: see
  stream-trainer.multiPod);
- autoscaling.partitions stated, the maximum within it (a member beyond the partition count
  is assigned nothing and trains nothing), the minimum within the maximum;
- KEDA: exactly one input topic (its kafka trigger reads the lag of one topic).
*/}}
{{- define "stream-trainer.autoscaler" -}}
{{- $a := .Values.autoscaling }}
{{- if and $a.keda.enabled $a.hpa.enabled }}
{{- fail "autoscaling.keda and autoscaling.hpa are mutually exclusive: two autoscalers would fight over the workload's replicas (enable one)" }}
{{- end }}
{{- $kind := "" }}
{{- $min := 0 }}
{{- $max := 0 }}
{{- if $a.keda.enabled }}
{{- $kind = "keda" }}
{{- $min = int $a.keda.minReplicaCount }}
{{- $max = $a.keda.maxReplicaCount }}
{{- else if $a.hpa.enabled }}
{{- $kind = "hpa" }}
{{- $min = int $a.hpa.minReplicas }}
{{- $max = $a.hpa.maxReplicas }}
{{- end }}
{{- if $kind }}
{{- $scope := include "stream-trainer.scope" . }}
{{- if ne $scope "partition" }}
{{- fail (printf "autoscaling.%s needs config.model.scope partition (it is %s): with global scope one pod trains and the others stand by, so more replicas add no throughput" $kind $scope) }}
{{- end }}
{{- if include "stream-trainer.needsDataVolume" . }}
{{- fail (printf "autoscaling.%s needs config.checkpoint.dir and config.registry.root both on an object store (s3://, gs://, az://): a partition's checkpoints must be readable by whichever pod the group gives it, and a pod with a volume cannot be added or removed at will" $kind) }}
{{- end }}
{{- if kindIs "invalid" $a.partitions }}
{{- fail (printf "autoscaling.partitions must state the input partition count when autoscaling.%s is enabled: the maximum replicas may not exceed it (a member beyond it is assigned nothing)" $kind) }}
{{- end }}
{{- $partitions := int $a.partitions }}
{{- $maxName := ternary "autoscaling.keda.maxReplicaCount" "autoscaling.hpa.maxReplicas" (eq $kind "keda") }}
{{- $max = kindIs "invalid" $max | ternary $partitions (int $max) }}
{{- if gt $max $partitions }}
{{- fail (printf "%s (%d) exceeds autoscaling.partitions (%d): a member beyond the partition count is assigned no partition and trains nothing" $maxName $max $partitions) }}
{{- end }}
{{- if gt $min $max }}
{{- fail (printf "the minimum replicas of autoscaling.%s (%d) exceed its maximum (%d)" $kind $min $max) }}
{{- end }}
{{- if eq $kind "keda" }}
{{- $topics := .Values.config.topics.input }}
{{- if ne (len $topics) 1 }}
{{- fail (printf "autoscaling.keda needs exactly one input topic (config.topics.input has %d: %s): its kafka trigger reads the lag of one topic; autoscaling.hpa sums the lag of every input topic" (len $topics) (join ", " $topics)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $kind }}
{{- end }}

{{/*
The autoscaler's maximum replicas: its own value, or autoscaling.partitions when unset.
*/}}
{{- define "stream-trainer.autoscalerMax" -}}
{{- $a := .Values.autoscaling }}
{{- $max := ternary $a.keda.maxReplicaCount $a.hpa.maxReplicas (eq (include "stream-trainer.autoscaler" .) "keda") }}
{{- kindIs "invalid" $max | ternary $a.partitions $max | int }}
{{- end }}

{{/*
"true" when the release may run more than one pod (replicaCount > 1 or an autoscaler). Only
valid with both stores remote: with a checkpoint folder on a volume a second pod could never
take over a writer (global scope) nor a partition (partition scope), so the render fails. A
fixed kafka.group_instance_id would give every replica the same static member id (they
would fence each other), so it must be left to the service's per-pod default.
*/}}
{{- define "stream-trainer.multiPod" -}}
{{- $autoscaler := include "stream-trainer.autoscaler" . }}
{{- if or (gt (int .Values.replicaCount) 1) $autoscaler }}
{{- if include "stream-trainer.needsDataVolume" . }}
{{- if eq (include "stream-trainer.scope" .) "partition" }}
{{- fail (printf "replicaCount %v needs config.checkpoint.dir and config.registry.root both on an object store (s3://, gs://, az://): with model.scope partition a partition's checkpoints move with it to another pod, which a local checkpoint folder cannot do (docs/kubernetes.md, Partition scope)" .Values.replicaCount) }}
{{- end }}
{{- fail (printf "replicaCount %v needs config.checkpoint.dir and config.registry.root both on an object store (s3://, gs://, az://): with a local checkpoint folder the extra pods could never take over and would only stand by idle (docs/kubernetes.md, Hot standby)" .Values.replicaCount) }}
{{- end }}
{{- with .Values.config.kafka.group_instance_id }}
{{- fail (printf "config.kafka.group_instance_id (%s) must be unset when replicaCount > 1 or autoscaling is on: every pod needs its own member id (the service defaults it per pod)" .) }}
{{- end }}
{{- true }}
{{- end }}
{{- end }}

{{/*
"true" when the release runs hot standbys: several pods of a global-scope model.
*/}}
{{- define "stream-trainer.standby" -}}
{{- if and (include "stream-trainer.multiPod" .) (eq (include "stream-trainer.scope" .) "global") }}true{{- end }}
{{- end }}

{{/*
"true" when a Deployment rolls by surge: partition scope with no volume. A new pod joins the
group before an old one leaves, so the partitions it is handed are trained without a gap
(cooperative hand-over).
*/}}
{{- define "stream-trainer.surge" -}}
{{- if and (eq (include "stream-trainer.scope" .) "partition") (not (include "stream-trainer.needsDataVolume" .)) }}true{{- end }}
{{- end }}

{{/*
"true" when readiness means up (/healthz), not trained (/readyz): with standbys (a standby's
/readyz is 503 forever) and whenever members share partitions (a member's assignment depends
on the group, not on the pod: a surge pod or a member beyond the partition count may hold
none). Rollouts, budgets and the helm test then wait for pods that run, not for assignments.
*/}}
{{- define "stream-trainer.readyIsUp" -}}
{{- if or (include "stream-trainer.multiPod" .) (include "stream-trainer.surge" .) }}true{{- end }}
{{- end }}
