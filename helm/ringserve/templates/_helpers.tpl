{{/* Names */}}
{{- define "ringserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ringserve.fullname" -}}
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

{{- define "ringserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ringserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include with (list $ "router") */}}
{{- define "ringserve.selectorLabels" -}}
{{- $top := index . 0 -}}
app.kubernetes.io/name: {{ include "ringserve.name" $top }}
app.kubernetes.io/instance: {{ $top.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "ringserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ringserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ringserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "ringserve.clusterName" -}}
{{- default (include "ringserve.fullname" .) .Values.clusterName }}
{{- end }}

{{- define "ringserve.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis:6379/0" (include "ringserve.fullname" .) }}
{{- else }}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url }}
{{- end }}
{{- end }}

{{- define "ringserve.routerAddress" -}}
{{- printf "%s-router:%d" (include "ringserve.fullname" .) (int .Values.router.service.port) }}
{{- end }}

{{/* Environment every ringserve container has besides the ConfigMap: its pod IP and the Redis password. */}}
{{- define "ringserve.commonEnv" -}}
- name: RINGSERVE_ADVERTISE_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret }}
- name: RINGSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.passwordKey }}
{{- end }}
{{- end }}

{{/* The model volume (pvc or hostPath), mounted read-only. */}}
{{- define "ringserve.modelVolume" -}}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required when model.source is hostPath" .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- end }}
{{- end }}

{{- define "ringserve.modelMount" -}}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- if has .Values.model.source (list "pvc" "hostPath") }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* gRPC probes. include with (dict "port" N "ready" "ringserve.ready" "top" $) */}}
{{- define "ringserve.probes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
    service: ringserve.live
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ max 1 (div .top.Values.startupTimeoutSeconds 10) }}
livenessProbe:
  grpc:
    port: {{ .port }}
    service: ringserve.live
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  grpc:
    port: {{ .port }}
    {{- if .ready }}
    service: {{ .ready }}
    {{- end }}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 2
{{- end }}

{{/* Resources of a worker: the values' resources plus its GPUs. include with (list $ .Values.prefill gpus) */}}
{{- define "ringserve.workerResources" -}}
{{- $top := index . 0 }}
{{- $tier := index . 1 }}
{{- $gpus := index . 2 }}
{{- $res := deepCopy ($tier.resources | default dict) }}
{{- if $top.Values.gpu.enabled }}
{{- $limits := $res.limits | default dict }}
{{- $_ := set $limits $top.Values.gpu.resourceName (toString $gpus) }}
{{- $_ := set $res "limits" $limits }}
{{- $requests := $res.requests | default dict }}
{{- $_ := set $requests $top.Values.gpu.resourceName (toString $gpus) }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}
