{{/* The pod template of a prefill or decode pod, shared by the StatefulSet (role "group": the whole group in
one pod) and the LeaderWorkerSet (role "leader": rank 0, serving gRPC; role "worker": one joining rank, no gRPC).
include with (dict "top" $ "tier" "prefill"|"decode" "role" "group"|"leader"|"worker") */}}
{{- define "ringserve.workerPod" -}}
{{- $ := .top }}
{{- $tier := .tier }}
{{- $role := .role }}
{{- $v := index $.Values $tier }}
{{- $ranks := ternary $v.cpSize $v.kvpSize (eq $tier "prefill") }}
{{- $tp := int $v.tpSize }}
{{- /* a pod holds the whole group (tp x ranks GPUs), or, with spanHosts, one CP/KVP rank's TP group (tp GPUs) */}}
{{- $gpus := ternary (mul $tp $ranks) $tp (eq $role "group") -}}
metadata:
  labels:
    {{- include "ringserve.selectorLabels" (list $ $tier) | nindent 4 }}
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") $ | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "ringserve.serviceAccountName" $ }}
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # SIGTERM drains the group (drainTimeoutSeconds at most), then it stops its ranks and exits.
  terminationGracePeriodSeconds: {{ add $v.drainTimeoutSeconds 30 }}
  containers:
    - name: {{ $tier }}
      image: {{ include "ringserve.image" $ }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      command: ["ringserve", {{ $tier | quote }}]
      args:
        - {{ ternary "--cp" "--kvp" (eq $tier "prefill") }}
        - {{ $ranks | quote }}
        - --tp
        - {{ $tp | quote }}
        {{- if eq $role "worker" }}
        # This pod's CP/KVP rank (its TP group: world ranks R*tp .. R*tp+tp-1, a process per GPU) and its leader's
        # rank link, both from the LeaderWorkerSet controller.
        - --group-rank
        - $(LWS_WORKER_INDEX)
        - --local-ranks
        - {{ $tp | quote }}
        - --group-leader
        - $(LWS_LEADER_ADDRESS):$(RINGSERVE_GROUP_PORT)
        {{- else }}
        {{- if eq $tier "prefill" }}
        - --strategy
        - {{ $v.strategy | quote }}
        - --schedule
        - {{ $v.schedule | default "lrs" | quote }}
        - --target-pass-s
        - {{ $v.targetPassSeconds | default 0.25 | quote }}
        {{- else }}
        - --max-batch
        - {{ $v.maxBatch | quote }}
        {{- end }}
        - --kv-blocks
        - {{ $v.kvBlocks | quote }}
        {{- end }}
        {{- if eq $role "leader" }}
        # CP/KVP rank 0's TP group here (world ranks 0..tp-1); the others are the group's worker pods, joining at this
        # pod's IP.
        - --local-ranks
        - {{ $tp | quote }}
        - --group-host
        - $(POD_IP)
        {{- end }}
        {{- range $v.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "ringserve.fullname" $ }}
      env:
        {{- if ne $role "group" }}
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: RINGSERVE_GROUP_PORT  # the leader's rank link (torch.distributed picks ports of its own)
          value: {{ $v.groupPort | quote }}
        {{- end }}
        {{- include "ringserve.commonEnv" (list $ $tier) | nindent 8 }}
        - name: RINGSERVE_PORT
          value: {{ $v.port | quote }}
        - name: RINGSERVE_METRICS_PORT
          value: {{ $v.metricsPort | quote }}
        - name: RINGSERVE_DRAIN_TIMEOUT_S
          value: {{ $v.drainTimeoutSeconds | quote }}
        {{- if eq $tier "decode" }}
        - name: RINGSERVE_KV_PORT
          value: {{ $v.kvPort | quote }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or (ne $role "worker") (eq $tier "decode") }}
      ports:
        {{- if ne $role "worker" }}
        - name: grpc
          containerPort: {{ $v.port }}
        - name: metrics
          containerPort: {{ $v.metricsPort }}
        {{- end }}
        {{- if eq $role "leader" }}
        - name: rank-link
          containerPort: {{ $v.groupPort }}
        {{- end }}
        {{- if eq $tier "decode" }}
        {{- /* world rank r's KV receiver listens on kvPort + r: the leader has ranks 0..tp-1, a worker tp of tp..tp*K-1 */}}
        {{- $first := int (ternary $tp 0 (eq $role "worker")) }}
        {{- $last := int (ternary $tp (mul $tp $ranks) (eq $role "leader")) }}
        {{- range $r := untilStep $first $last 1 }}
        - name: kv-{{ $r }}
          containerPort: {{ add $v.kvPort $r }}
        {{- end }}
        {{- end }}
      {{- end }}
      {{- if ne $role "worker" }}
      {{- include "ringserve.probes" (dict "port" $v.port "ready" "ringserve.ready" "top" $) | nindent 6 }}
      {{- end }}
      resources:
        {{- include "ringserve.workerResources" (list $ $v $gpus) | nindent 8 }}
      volumeMounts:
        {{- include "ringserve.modelMount" $ | nindent 8 }}
        {{- include "ringserve.securityMounts" (list $ $tier) | nindent 8 }}
        - name: shm
          mountPath: /dev/shm
        - name: cache
          mountPath: /root/.cache
  volumes:
    {{- include "ringserve.modelVolume" $ | nindent 4 }}
    {{- include "ringserve.securityVolumes" (list $ $tier) | nindent 4 }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shmSize }}
    - name: cache
      emptyDir: {}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
