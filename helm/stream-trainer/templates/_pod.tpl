{{/*
The pod template shared by the Deployment and the StatefulSet.
*/}}
{{- define "stream-trainer.podTemplate" -}}
{{- $ck := .Values.secrets.checkpointKey }}
{{- $sasl := .Values.secrets.kafkaSasl }}
{{- $tls := .Values.secrets.kafkaTls }}
{{- $useSasl := include "stream-trainer.useSasl" . -}}
metadata:
  labels:
    {{- include "stream-trainer.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Rolls the pod whenever the rendered config file changes.
    checksum/config: {{ include "stream-trainer.config" . | sha256sum }}
    {{- if .Values.search.jobs.enabled }}
    # The search Job template is mounted by subPath (never refreshed in a running pod).
    checksum/search-job: {{ include "stream-trainer.searchJob" . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "stream-trainer.serviceAccountName" . }}
  {{- if .Values.search.jobs.enabled }}
  # The service creates, watches and deletes search Jobs (the Role allows nothing else).
  automountServiceAccountToken: true
  {{- else }}
  # The service never talks to the Kubernetes API.
  automountServiceAccountToken: false
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  # Above config.shutdown.timeout_s: SIGTERM -> final checkpoint -> exit before SIGKILL.
  terminationGracePeriodSeconds: {{ include "stream-trainer.terminationGracePeriodSeconds" . }}
  containers:
    - name: stream-trainer
      image: {{ include "stream-trainer.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - run
        - --config
        - /etc/stream-trainer/config.yaml
      ports:
        - name: http
          containerPort: {{ .Values.config.http.port | default 9100 }}
          protocol: TCP
      env:
        - name: TMPDIR
          value: /tmp
        {{- if and $ck.existingSecret (eq $ck.as "env") }}
        - name: STREAM_TRAINER_CHECKPOINT__HMAC_KEY
          valueFrom:
            secretKeyRef:
              name: {{ $ck.existingSecret }}
              key: {{ $ck.key }}
        {{- end }}
        {{- if and $useSasl (eq $sasl.as "env") }}
        - name: STREAM_TRAINER_KAFKA__SASL_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ $sasl.existingSecret }}
              key: {{ $sasl.key }}
        {{- end }}
        {{- if .Values.search.jobs.enabled }}
        - name: STREAM_TRAINER_SEARCH_DATABASE_URL_FILE
          value: {{ include "stream-trainer.searchDbDir" . }}/{{ .Values.search.jobs.databaseUrl.key }}
        {{- end }}
        {{- with .Values.secrets.objectStore }}
        {{- if .existingSecret }}
        - name: AWS_ACCESS_KEY_ID
          valueFrom:
            secretKeyRef:
              name: {{ .existingSecret }}
              key: {{ .accessKeyIdKey }}
        - name: AWS_SECRET_ACCESS_KEY
          valueFrom:
            secretKeyRef:
              name: {{ .existingSecret }}
              key: {{ .secretAccessKeyKey }}
        {{- end }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.probes.startup }}
      {{- if .enabled }}
      startupProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: {{ .periodSeconds }}
        failureThreshold: {{ .failureThreshold }}
        timeoutSeconds: {{ .timeoutSeconds }}
      {{- end }}
      {{- end }}
      {{- with .Values.probes.liveness }}
      {{- if .enabled }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: {{ .periodSeconds }}
        failureThreshold: {{ .failureThreshold }}
        timeoutSeconds: {{ .timeoutSeconds }}
      {{- end }}
      {{- end }}
      {{- $up := include "stream-trainer.readyIsUp" . }}
      {{- with .Values.probes.readiness }}
      {{- if .enabled }}
      readinessProbe:
        httpGet:
          # With several members, ready = up (training, standing by, or holding no
          # partition): /readyz answers 503 on a standby forever and a member's assignment
          # is the group's doing, which would stall every rollout and disruption budget.
          path: {{ ternary "/healthz" "/readyz" (not (empty $up)) }}
          port: http
        periodSeconds: {{ .periodSeconds }}
        failureThreshold: {{ .failureThreshold }}
        timeoutSeconds: {{ .timeoutSeconds }}
      {{- end }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: config
          mountPath: /etc/stream-trainer/config.yaml
          subPath: config.yaml
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- if include "stream-trainer.needsDataVolume" . }}
        - name: data
          mountPath: {{ .Values.persistence.mountPath }}
        {{- end }}
        {{- if and $ck.existingSecret (eq $ck.as "file") }}
        - name: checkpoint-key
          mountPath: {{ include "stream-trainer.checkpointKeyDir" . }}
          readOnly: true
        {{- end }}
        {{- if and $useSasl (eq $sasl.as "file") }}
        - name: kafka-sasl
          mountPath: {{ include "stream-trainer.saslDir" . }}
          readOnly: true
        {{- end }}
        {{- if $tls.existingSecret }}
        - name: kafka-tls
          mountPath: {{ include "stream-trainer.tlsDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.search.jobs.enabled }}
        - name: search-job
          mountPath: {{ include "stream-trainer.searchJobTemplatePath" . }}
          subPath: search-job.yaml
          readOnly: true
        - name: search-db
          mountPath: {{ include "stream-trainer.searchDbDir" . }}
          readOnly: true
        - name: search-snapshots
          mountPath: {{ .Values.search.jobs.snapshots.mountPath }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "stream-trainer.fullname" . }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    {{- if not (include "stream-trainer.needsDataVolume" .) }}
    {{- /* Registry and checkpoints on the object store: no data volume at all. */}}
    {{- else if not .Values.persistence.enabled }}
    - name: data
      emptyDir: {}
    {{- else if .Values.persistence.existingClaim }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ .Values.persistence.existingClaim }}
    {{- else if eq .Values.workload.kind "Deployment" }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ include "stream-trainer.fullname" . }}
    {{- end }}
    {{- if and $ck.existingSecret (eq $ck.as "file") }}
    - name: checkpoint-key
      secret:
        secretName: {{ $ck.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ $ck.key }}
            path: {{ $ck.key }}
    {{- end }}
    {{- if and $useSasl (eq $sasl.as "file") }}
    - name: kafka-sasl
      secret:
        secretName: {{ $sasl.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ $sasl.key }}
            path: {{ $sasl.key }}
    {{- end }}
    {{- if $tls.existingSecret }}
    - name: kafka-tls
      secret:
        secretName: {{ $tls.existingSecret }}
        defaultMode: 0440
        items:
          {{- range (list $tls.caKey $tls.certKey $tls.keyKey) }}
          {{- if . }}
          - key: {{ . }}
            path: {{ . }}
          {{- end }}
          {{- end }}
    {{- end }}
    {{- if .Values.search.jobs.enabled }}
    {{- $jobs := .Values.search.jobs }}
    - name: search-job
      configMap:
        name: {{ include "stream-trainer.fullname" . }}-search-job
    - name: search-db
      secret:
        secretName: {{ $jobs.databaseUrl.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ $jobs.databaseUrl.key }}
            path: {{ $jobs.databaseUrl.key }}
    - name: search-snapshots
      persistentVolumeClaim:
        claimName: {{ $jobs.snapshots.existingClaim }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml .Values.topologySpreadConstraints | nindent 4 }}
  {{- else if and (include "stream-trainer.multiPod" .) .Values.standby.spreadAcrossNodes }}
  # Spread over nodes: a standby on the writer's node would die with it; members of
  # partition scope on one node would all rebalance at once when it goes.
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: DoNotSchedule
      labelSelector:
        matchLabels:
          {{- include "stream-trainer.selectorLabels" . | nindent 10 }}
  {{- end }}
{{- end }}
