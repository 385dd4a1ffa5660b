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
{{- printf "%s://%s-redis:6379/0" (ternary "rediss" "redis" .Values.tls.enabled) (include "ringserve.fullname" .) }}
{{- else }}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url }}
{{- end }}
{{- end }}

{{- define "ringserve.routerAddress" -}}
{{- printf "%s-router:%d" (include "ringserve.fullname" .) (int .Values.router.service.port) }}
{{- end }}

{{/* RINGSERVE_REDIS_PASSWORD from its Secret, if Redis has one. include with $ */}}
{{- define "ringserve.redisPasswordEnv" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret }}
- name: RINGSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.passwordKey }}
{{- else if and .Values.redis.enabled .Values.redis.auth }}
- name: RINGSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ringserve.fullname" . }}-redis-auth
      key: password
{{- end }}
{{- end }}

{{/* The in-chart Redis under TLS: every client presents its pod's certificate (mutual TLS) and verifies
Redis's against the deployment CA. include with $ */}}
{{- define "ringserve.redisTlsEnv" -}}
{{- if and .Values.redis.enabled .Values.tls.enabled }}
- name: RINGSERVE_REDIS_CA_CERT
  value: /etc/ringserve/tls/ca.crt
- name: RINGSERVE_REDIS_CLIENT_CERT
  value: /etc/ringserve/tls/tls.crt
- name: RINGSERVE_REDIS_CLIENT_KEY
  value: /etc/ringserve/tls/tls.key
{{- end }}
{{- end }}

{{/* The in-chart Redis's certificate reloader (its tls-reload container): every redis.certReloadSeconds,
if the mounted files changed, CONFIG SET them so Redis loads them (the password in REDISCLI_AUTH). */}}
{{- define "ringserve.redisTlsReload" -}}
files="/etc/redis-tls/tls.crt /etc/redis-tls/tls.key /etc/redis-tls/ca.crt"
loaded=$(cat $files | cksum)
while sleep {{ .Values.redis.certReloadSeconds }}; do
  now=$(cat $files | cksum) && [ "$now" != "$loaded" ] || continue
  if redis-cli --tls --cacert /etc/redis-tls/ca.crt --cert /etc/redis-tls/tls.crt --key /etc/redis-tls/tls.key -h localhost -p 6379 CONFIG SET tls-cert-file /etc/redis-tls/tls.crt tls-key-file /etc/redis-tls/tls.key tls-ca-cert-file /etc/redis-tls/ca.crt | grep -q OK; then
    loaded=$now; echo "tls-reload: Redis loaded the changed certificate files"
  else
    echo "tls-reload: Redis did not load the changed certificate files; trying again"
  fi
done
{{- end }}

{{/* Environment every ringserve container has besides the ConfigMap: where peers reach it, the Redis
password, and its security settings. include with (list $ "router"|"prefill"|"decode") */}}
{{- define "ringserve.commonEnv" -}}
{{- $top := index . 0 }}
{{- $role := index . 1 }}
{{- if and (or $top.Values.tls.enabled $top.Values.planner.enabled) (ne $role "router") }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: RINGSERVE_ADVERTISE_HOST  # the name its certificate carries (the router verifies it); the planner reads the ordinal
  value: {{ printf "$(POD_NAME).%s-%s.%s.svc" (include "ringserve.fullname" $top) $role $top.Release.Namespace | quote }}
{{- else }}
- name: RINGSERVE_ADVERTISE_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}
{{- include "ringserve.redisPasswordEnv" $top }}
{{- include "ringserve.redisTlsEnv" $top }}
{{- if $top.Values.tls.enabled }}
- name: RINGSERVE_TLS_CERT
  value: /etc/ringserve/tls/tls.crt
- name: RINGSERVE_TLS_KEY
  value: /etc/ringserve/tls/tls.key
- name: RINGSERVE_TLS_CA
  value: /etc/ringserve/tls/ca.crt
{{- else }}
- name: RINGSERVE_INSECURE  # plaintext gRPC on the pod network: set tls.enabled to turn TLS on
  value: "true"
{{- end }}
{{- if ne $role "router" }}
- name: RINGSERVE_DEPLOYMENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $top.Values.deploymentSecret.existingSecret | default (printf "%s-deployment-secret" (include "ringserve.fullname" $top)) }}
      key: deployment-secret
{{- else }}
{{- if $top.Values.apiKeys.existingSecret }}
- name: RINGSERVE_API_KEYS_FILE
  value: /etc/ringserve/api-keys/{{ $top.Values.apiKeys.key }}
{{- end }}
{{- if and $top.Values.tls.enabled $top.Values.tls.clientCaSecret }}
- name: RINGSERVE_TLS_CLIENT_CA
  value: /etc/ringserve/client-ca/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret with a role's certificate (tls.crt, tls.key, ca.crt). include with (list $ role) */}}
{{- define "ringserve.tlsSecret" -}}
{{- $top := index . 0 }}
{{- $role := index . 1 }}
{{- if $top.Values.tls.certManager.enabled }}
{{- printf "%s-%s-tls" (include "ringserve.fullname" $top) $role }}
{{- else }}
{{- required (printf "tls.secrets.%s (a Secret with tls.crt, tls.key, ca.crt) is required with tls.enabled, or set tls.certManager.enabled" $role) (index $top.Values.tls.secrets $role | default "") }}
{{- end }}
{{- end }}

{{/* Security volumes and mounts of a role: certificates, API keys, client CA (all re-read on change). */}}
{{- define "ringserve.securityVolumes" -}}
{{- $top := index . 0 }}
{{- $role := index . 1 }}
{{- if $top.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "ringserve.tlsSecret" . }}
{{- end }}
{{- if and (eq $role "router") $top.Values.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ $top.Values.apiKeys.existingSecret }}
{{- end }}
{{- if and (eq $role "router") $top.Values.tls.enabled $top.Values.tls.clientCaSecret }}
- name: client-ca
  secret:
    secretName: {{ $top.Values.tls.clientCaSecret }}
{{- end }}
{{- end }}

{{- define "ringserve.securityMounts" -}}
{{- $top := index . 0 }}
{{- $role := index . 1 }}
{{- if $top.Values.tls.enabled }}
- name: tls
  mountPath: /etc/ringserve/tls
  readOnly: true
{{- end }}
{{- if and (eq $role "router") $top.Values.apiKeys.existingSecret }}
- name: api-keys
  mountPath: /etc/ringserve/api-keys
  readOnly: true
{{- end }}
{{- if and (eq $role "router") $top.Values.tls.enabled $top.Values.tls.clientCaSecret }}
- name: client-ca
  mountPath: /etc/ringserve/client-ca
  readOnly: true
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

{{/* Fallbacks for clusters older than the chart's current manifests need (docs/KUBERNETES.md): the kubelet's
gRPC probes (on by default from 1.24), policy/v1 PodDisruptionBudgets (1.21), the preStop sleep action
(on by default from 1.30). Each is "true" or empty. include with $ */}}
{{- define "ringserve.hasGrpcProbes" -}}
{{- if semverCompare ">=1.24-0" .Capabilities.KubeVersion.Version }}true{{ end }}
{{- end }}

{{- define "ringserve.hasPdbV1" -}}
{{- if and (.Capabilities.APIVersions.Has "policy/v1") (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version) }}true{{ end }}
{{- end }}

{{- define "ringserve.hasSleepAction" -}}
{{- if semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version }}true{{ end }}
{{- end }}

{{/* Probes on a health name: gRPC probes, or `ringserve health` exec probes under TLS (which the kubelet's
gRPC probes do not speak; with the pod's own certificate) and on clusters without gRPC probes.
include with (dict "port" N "service" NAME "top" $) */}}
{{- define "ringserve.probe" -}}
{{- if or .top.Values.tls.enabled (not (include "ringserve.hasGrpcProbes" .top)) }}
exec:
  command: ["ringserve", "health", "--port", {{ .port | quote }}, "--service", {{ .service | quote }}]
{{- else }}
grpc:
  port: {{ .port }}
  {{- if .service }}
  service: {{ .service }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Startup, liveness and readiness probes. include with (dict "port" N "ready" "ringserve.ready" "top" $) */}}
{{- define "ringserve.probes" -}}
startupProbe:
  {{- include "ringserve.probe" (dict "port" .port "service" "ringserve.live" "top" .top) | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ max 1 (div .top.Values.startupTimeoutSeconds 10) }}
livenessProbe:
  {{- include "ringserve.probe" (dict "port" .port "service" "ringserve.live" "top" .top) | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  {{- include "ringserve.probe" (dict "port" .port "service" .ready "top" .top) | nindent 2 }}
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
