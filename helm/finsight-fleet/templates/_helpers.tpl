{{/*
Names, labels and the pieces every fleet pod shares.
*/}}

{{- define "finsight-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finsight-fleet.fullname" -}}
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

{{- define "finsight-fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include "finsight-fleet.selectorLabels" (dict "root" $ "component" "api") */}}
{{- define "finsight-fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finsight-fleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Common labels of one component (same arguments as selectorLabels). */}}
{{- define "finsight-fleet.labels" -}}
helm.sh/chart: {{ include "finsight-fleet.chart" .root }}
{{ include "finsight-fleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: finsight-fleet
{{- end }}

{{- define "finsight-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finsight-fleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The fleet image: include "finsight-fleet.image" (dict "root" $ "image" $pool.image) (image may be nil). */}}
{{- define "finsight-fleet.image" -}}
{{- $image := mergeOverwrite (deepCopy .root.Values.image) (default dict .image) }}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion (toString $image.tag)) }}
{{- end }}

{{- define "finsight-fleet.imagePullPolicy" -}}
{{- $image := mergeOverwrite (deepCopy .root.Values.image) (default dict .image) }}
{{- $image.pullPolicy | default "IfNotPresent" }}
{{- end }}

{{- define "finsight-fleet.redisName" -}}
{{- printf "%s-redis" (include "finsight-fleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* REDIS_URL when it does not come from a Secret: redis.url, else the embedded Redis Service. */}}
{{- define "finsight-fleet.redisUrl" -}}
{{- if .Values.redis.url }}
{{- .Values.redis.url }}
{{- else if .Values.redis.embedded.enabled }}
{{- printf "redis://%s:6379/0" (include "finsight-fleet.redisName" .) }}
{{- else if not .Values.redis.existingSecret }}
{{- fail "set redis.url, redis.existingSecret, or redis.embedded.enabled=true" }}
{{- end }}
{{- end }}

{{- define "finsight-fleet.modelStoreClaim" -}}
{{- default (printf "%s-model-store" (include "finsight-fleet.fullname" .)) .Values.modelStore.existingClaim }}
{{- end }}

{{/* POOLS for /readyz: adapter:device of every enabled pool with readiness on, without duplicates. */}}
{{- define "finsight-fleet.poolsSpec" -}}
{{- $specs := list }}
{{- range .Values.pools }}
{{- if and (ne (toString .enabled) "false") (ne (toString .readiness) "false") }}
{{- $specs = append $specs (printf "%s:%s" .adapter .device) }}
{{- end }}
{{- end }}
{{- $specs | uniq | join "," }}
{{- end }}

{{/* Warm-shutdown grace of a worker: the pool's own, else the job hard time limit plus 30 s. */}}
{{- define "finsight-fleet.workerGrace" -}}
{{- if .pool.terminationGracePeriodSeconds }}
{{- .pool.terminationGracePeriodSeconds }}
{{- else }}
{{- add (int (include "finsight-fleet.str" (default "600" .root.Values.config.JOB_TIME_LIMIT_SECONDS))) 30 }}
{{- end }}
{{- end }}

{{/* Environment of every fleet container: the ConfigMap, and REDIS_URL from a Secret when one is named. */}}
{{- define "finsight-fleet.envFrom" -}}
- configMapRef:
    name: {{ include "finsight-fleet.fullname" . }}-config
{{- end }}

{{- define "finsight-fleet.redisSecretEnv" -}}
{{- if .Values.redis.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- end }}
{{- end }}

{{/* The env list of a fleet container: REDIS_URL from its Secret, then a map of fleet settings (may be empty).
include "finsight-fleet.env" (dict "root" $ "env" $map) */}}
{{- define "finsight-fleet.env" -}}
{{- include "finsight-fleet.redisSecretEnv" .root }}
{{- include "finsight-fleet.envMap" (default dict .env) }}
{{- end }}

{{/* A setting's value as a string. Numbers from values files arrive as float64: whole ones print as integers
(1048576, not 1.048576e+06). */}}
{{- define "finsight-fleet.str" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- . | int64 | toString }}
{{- else }}
{{- . | toString }}
{{- end }}
{{- end }}

{{/* Extra env of a component or pool, from a map of fleet settings: include "finsight-fleet.envMap" $map */}}
{{- define "finsight-fleet.envMap" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ include "finsight-fleet.str" $value | quote }}
{{- end }}
{{- end }}

{{/* Pod annotations that roll the pods when the fleet's configuration changes. */}}
{{- define "finsight-fleet.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/* Volumes every fleet pod mounts: /tmp (the root filesystem may be read-only) and the model store. */}}
{{- define "finsight-fleet.volumes" -}}
- name: tmp
  emptyDir: {}
- name: model-store
  persistentVolumeClaim:
    claimName: {{ include "finsight-fleet.modelStoreClaim" . }}
{{- end }}

{{/* include "finsight-fleet.volumeMounts" (dict "root" $ "readOnly" true) */}}
{{- define "finsight-fleet.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: model-store
  mountPath: {{ .root.Values.modelStore.mountPath }}
  {{- if .readOnly }}
  readOnly: true
  {{- end }}
{{- end }}
