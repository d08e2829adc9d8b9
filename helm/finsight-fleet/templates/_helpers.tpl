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

{{/* "true" when the chart runs its own Redis (no external URL and no URL Secret), else empty. */}}
{{- define "finsight-fleet.redisEmbedded" -}}
{{- if and .Values.redis.embedded.enabled (not .Values.redis.url) (not .Values.redis.existingSecret) }}true{{ end }}
{{- end }}

{{/* REDIS_URL when the chart writes it (into its Secret): redis.url, else the embedded Redis Service. */}}
{{- define "finsight-fleet.redisUrl" -}}
{{- if .Values.redis.url }}
{{- if and .Values.redis.tls.enabled (not (hasPrefix "rediss://" .Values.redis.url)) }}
{{- fail "redis.tls.enabled needs a rediss:// redis.url" }}
{{- end }}
{{- .Values.redis.url }}
{{- else if .Values.redis.embedded.enabled }}
{{- printf "%s://%s:6379/0" (.Values.redis.tls.enabled | ternary "rediss" "redis") (include "finsight-fleet.redisName" .) }}
{{- else if not .Values.redis.existingSecret }}
{{- fail "set redis.url, redis.existingSecret, or redis.embedded.enabled=true" }}
{{- end }}
{{- end }}

{{/* The chart's Secret of Redis' URL and (when the chart manages it) password. */}}
{{- define "finsight-fleet.redisSecretName" -}}
{{- printf "%s-redis-auth" (include "finsight-fleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret holding the key Prometheus scrapes the API's /metrics with (metrics.scrapeKey). */}}
{{- define "finsight-fleet.metricsKeySecretName" -}}
{{- default (printf "%s-metrics-key" (include "finsight-fleet.fullname" .) | trunc 63 | trimSuffix "-") .Values.metrics.scrapeKey.existingSecret }}
{{- end }}

{{/* "true" when the chart keeps Redis' password in its own Secret: no redis.auth.existingSecret, and the embedded
Redis (which needs one) or a redis.auth.password to hand to an external Redis. */}}
{{- define "finsight-fleet.redisChartPassword" -}}
{{- if and (not .Values.redis.auth.existingSecret) (or (include "finsight-fleet.redisEmbedded" .) .Values.redis.auth.password) }}true{{ end }}
{{- end }}

{{/* The Secret and key of Redis' password (empty name: the fleet has none beyond what the URL holds). */}}
{{- define "finsight-fleet.redisPasswordSecret" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else if include "finsight-fleet.redisChartPassword" . }}
{{- include "finsight-fleet.redisSecretName" . }}
{{- end }}
{{- end }}

{{- define "finsight-fleet.redisPasswordKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretPasswordKey }}{{ else }}redis-password{{ end }}
{{- end }}

{{/* The TLS Secret (required once redis.tls.enabled). */}}
{{- define "finsight-fleet.redisTlsSecret" -}}
{{- required "redis.tls.enabled needs redis.tls.existingSecret (a Secret with ca.crt, and tls.crt/tls.key for the embedded Redis)" .Values.redis.tls.existingSecret }}
{{- end }}

{{/* The label that lets a pod through the Redis NetworkPolicy: every fleet pod carries it. */}}
{{- define "finsight-fleet.redisClientLabel" -}}
finsight-fleet/redis-client: "true"
{{- end }}

{{- define "finsight-fleet.modelStoreClaim" -}}
{{- default (printf "%s-model-store" (include "finsight-fleet.fullname" .)) .Values.modelStore.existingClaim }}
{{- end }}

{{/* POOLS for /readyz: adapter:device of every enabled pool with readiness on, without duplicates. A pool that
KEDA may scale to zero is left out: the API must stay ready (and take its jobs) while it has no worker, or KEDA
would never see the backlog that wakes it. */}}
{{- define "finsight-fleet.poolsSpec" -}}
{{- $specs := list }}
{{- range .Values.pools }}
{{- $keda := include "finsight-fleet.keda" (dict "root" $ "pool" .) | fromJson }}
{{- $toZero := and (hasKey $keda "minReplicaCount") (eq (int $keda.minReplicaCount) 0) }}
{{- if and (ne (toString .enabled) "false") (ne (toString .readiness) "false") (not $toZero) }}
{{- $specs = append $specs (printf "%s:%s" .adapter .device) }}
{{- end }}
{{- end }}
{{- $specs | uniq | join "," }}
{{- end }}

{{/* KEDA settings of one pool as JSON: autoscaling.keda with the pool's own `keda` keys over it (key by key, so
that a pool's minReplicaCount 0 wins over a default of 1); "{}" when KEDA is off for the pool (autoscaling.keda
off, the pool's keda.enabled false, or the pool disabled).
  include "finsight-fleet.keda" (dict "root" $ "pool" $pool) | fromJson */}}
{{- define "finsight-fleet.keda" -}}
{{- $defaults := dig "keda" dict (default dict .root.Values.autoscaling) }}
{{- $own := default dict .pool.keda }}
{{- if and $defaults.enabled (ne (toString $own.enabled) "false") (ne (toString .pool.enabled) "false") }}
{{- $merged := deepCopy (omit $defaults "enabled") }}
{{- range $key, $value := omit $own "enabled" }}
{{- $_ := set $merged $key $value }}
{{- end }}
{{- toJson $merged }}
{{- else }}
{{- "{}" }}
{{- end }}
{{- end }}

{{/* Warm-shutdown grace of a worker: the pool's own, else the job hard time limit plus 30 s. */}}
{{- define "finsight-fleet.workerGrace" -}}
{{- if .pool.terminationGracePeriodSeconds }}
{{- .pool.terminationGracePeriodSeconds }}
{{- else }}
{{- add (int (include "finsight-fleet.str" (default "600" .root.Values.config.JOB_TIME_LIMIT_SECONDS))) 30 }}
{{- end }}
{{- end }}

{{/* Environment of every fleet container: the ConfigMap (Redis' connection comes from redisSecretEnv). */}}
{{- define "finsight-fleet.envFrom" -}}
- configMapRef:
    name: {{ include "finsight-fleet.fullname" . }}-config
{{- end }}

{{/* Redis' connection for a fleet container: REDIS_URL from a Secret, the password as a mounted file, and the
TLS files (see redisVolumes / redisVolumeMounts). */}}
{{- define "finsight-fleet.redisSecretEnv" -}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.redis.existingSecret }}
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
      {{- else }}
      name: {{ include "finsight-fleet.redisSecretName" . }}
      key: redis-url
      {{- end }}
{{- if include "finsight-fleet.redisPasswordSecret" . }}
- name: REDIS_PASSWORD_FILE
  value: /run/secrets/redis/password
{{- end }}
{{- if .Values.redis.tls.enabled }}
- name: REDIS_SSL_CA_CERTS
  value: /run/secrets/redis-tls/ca.crt
- name: REDIS_SSL_CERT_REQS
  value: {{ .Values.redis.tls.certReqs | quote }}
{{- if .Values.redis.tls.clientCertificate }}
- name: REDIS_SSL_CERTFILE
  value: /run/secrets/redis-tls/tls.crt
- name: REDIS_SSL_KEYFILE
  value: /run/secrets/redis-tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret volumes behind redisSecretEnv (may be empty). Secret files are 0440: readable through fsGroup. */}}
{{- define "finsight-fleet.redisVolumes" -}}
{{- with include "finsight-fleet.redisPasswordSecret" . }}
- name: redis-password
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: {{ include "finsight-fleet.redisPasswordKey" $ }}
        path: password
{{- end }}
{{- if .Values.redis.tls.enabled }}
- name: redis-tls
  secret:
    secretName: {{ include "finsight-fleet.redisTlsSecret" . }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
      {{- if .Values.redis.tls.clientCertificate }}
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      {{- end }}
{{- end }}
{{- end }}

{{- define "finsight-fleet.redisVolumeMounts" -}}
{{- if include "finsight-fleet.redisPasswordSecret" . }}
- name: redis-password
  mountPath: /run/secrets/redis
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.enabled }}
- name: redis-tls
  mountPath: /run/secrets/redis-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The env list of a fleet container: Redis' connection, then a map of fleet settings (may be empty).
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

{{/* Pod annotations that roll the pods when the fleet's configuration or the chart's Redis Secret changes (a new
password reaches Redis and every client together). */}}
{{- define "finsight-fleet.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/redis: {{ include (print .Template.BasePath "/redis-secret.yaml") . | sha256sum }}
{{- end }}

{{/* Volumes every fleet pod mounts: /tmp (the root filesystem may be read-only), the model store, Redis' secrets. */}}
{{- define "finsight-fleet.volumes" -}}
- name: tmp
  emptyDir: {}
- name: model-store
  persistentVolumeClaim:
    claimName: {{ include "finsight-fleet.modelStoreClaim" . }}
{{- include "finsight-fleet.redisVolumes" . }}
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
{{- include "finsight-fleet.redisVolumeMounts" .root }}
{{- end }}
