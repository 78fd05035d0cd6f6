{{/*
Search trials as a Kubernetes Indexed Job (search.jobs): paths and the Job template.
*/}}
{{- define "stream-trainer.searchDbDir" -}}/etc/stream-trainer/secrets/search-db{{- end }}
{{- define "stream-trainer.searchJobTemplatePath" -}}/etc/stream-trainer/search-job.yaml{{- end }}

{{/*
The Job the service creates for one search, less what it adds (name, study label,
parallelism and completions, --study and --snapshot). Same image and entry point as the
service; no service-account token (the pods never call the API).
*/}}
{{- define "stream-trainer.searchJob" -}}
{{- $jobs := .Values.search.jobs }}
{{- $ck := .Values.secrets.checkpointKey -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "stream-trainer.fullname" . }}-search
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "stream-trainer.labels" . | nindent 4 }}
    app.kubernetes.io/component: search-trials
spec:
  completionMode: Indexed
  completions: {{ $jobs.parallelism }}
  parallelism: {{ $jobs.parallelism }}
  backoffLimit: {{ $jobs.backoffLimit }}
  activeDeadlineSeconds: {{ $jobs.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $jobs.ttlSecondsAfterFinished }}
  template:
    metadata:
      # Not the service's selector labels: the Service and the NetworkPolicy must not pick
      # these pods up.
      labels:
        app.kubernetes.io/instance: {{ .Release.Name }}
        app.kubernetes.io/part-of: stream-trainer
        app.kubernetes.io/component: search-trials
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "stream-trainer.serviceAccountName" . }}
      automountServiceAccountToken: false
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
      containers:
        - name: search-worker
          image: {{ include "stream-trainer.image" . | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          args:
            - search
            - worker
            - --config
            - /etc/stream-trainer/config.yaml
          env:
            - name: TMPDIR
              value: /tmp
            - name: STREAM_TRAINER_SEARCH_DATABASE_URL_FILE
              value: {{ include "stream-trainer.searchDbDir" . }}/{{ $jobs.databaseUrl.key }}
            {{- if and $ck.existingSecret (eq $ck.as "env") }}
            - name: STREAM_TRAINER_CHECKPOINT__HMAC_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ $ck.existingSecret }}
                  key: {{ $ck.key }}
            {{- end }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          {{- with $jobs.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - name: config
              mountPath: /etc/stream-trainer/config.yaml
              subPath: config.yaml
              readOnly: true
            - name: tmp
              mountPath: /tmp
            - name: search-db
              mountPath: {{ include "stream-trainer.searchDbDir" . }}
              readOnly: true
            - name: search-snapshots
              mountPath: {{ $jobs.snapshots.mountPath }}
              readOnly: true
            {{- if and $ck.existingSecret (eq $ck.as "file") }}
            - name: checkpoint-key
              mountPath: {{ include "stream-trainer.checkpointKeyDir" . }}
              readOnly: true
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "stream-trainer.fullname" . }}
        - name: tmp
          emptyDir:
            sizeLimit: {{ .Values.tmpSizeLimit }}
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
            readOnly: true
        {{- if and $ck.existingSecret (eq $ck.as "file") }}
        - name: checkpoint-key
          secret:
            secretName: {{ $ck.existingSecret }}
            defaultMode: 0440
            items:
              - key: {{ $ck.key }}
                path: {{ $ck.key }}
        {{- end }}
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
