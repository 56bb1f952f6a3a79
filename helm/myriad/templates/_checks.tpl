{{/*
Mistakes between fields that the schema cannot see, refused at render time
with what to change (included once, from coordinator.yaml).
*/}}
{{- define "myriad.checks" -}}
{{- $workers := int .Values.worker.replicas -}}
{{- $c := .Values.coordinator.config -}}
{{- if gt (int $c.minWorkers) $workers -}}
{{- fail (printf "coordinator.config.minWorkers (%d) exceeds worker.replicas (%d): the first placement would wait forever" (int $c.minWorkers) $workers) -}}
{{- end -}}
{{- if gt (int $c.replicas) $workers -}}
{{- fail (printf "coordinator.config.replicas (%d) exceeds worker.replicas (%d): every expert needs that many workers" (int $c.replicas) $workers) -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.enabled) -}}
{{- fail "tls.certManager.enabled issues certificates for tls.enabled: turn that on too" -}}
{{- end -}}
{{- $https := 0 -}}
{{- range .Values.etcd.endpoints -}}{{- if hasPrefix "https://" . -}}{{- $https = add1 $https -}}{{- end -}}{{- end -}}
{{- if and (gt $https 0) (not .Values.etcd.tls.secret) -}}
{{- fail "etcd.endpoints are https://: set etcd.tls.secret (a Secret with ca.crt, and tls.crt/tls.key for client certificates)" -}}
{{- end -}}
{{- if and .Values.etcd.tls.secret (or (not .Values.etcd.endpoints) (ne $https (len .Values.etcd.endpoints))) -}}
{{- fail "etcd.tls.secret is set: every etcd.endpoints entry must be https:// (the bundled etcd serves plaintext)" -}}
{{- end -}}
{{- $hpa := .Values.router.autoscaling -}}
{{- if and $hpa.enabled (gt (int $hpa.minReplicas) (int $hpa.maxReplicas)) -}}
{{- fail (printf "router.autoscaling.minReplicas (%d) exceeds maxReplicas (%d)" (int $hpa.minReplicas) (int $hpa.maxReplicas)) -}}
{{- end -}}
{{- range $role := list "coordinator" "worker" "router" "kvcache" -}}
{{- $resources := (index $.Values $role).resources -}}
{{- range $kind := list "requests" "limits" -}}
{{- range $name, $_ := (index $resources $kind | default dict) -}}
{{- if not (or (has $name (list "cpu" "memory" "ephemeral-storage")) (hasPrefix "hugepages-" $name) (contains "/" $name)) -}}
{{- fail (printf "%s.resources.%s.%s: extended resources need their vendor's domain, e.g. nvidia.com/gpu" $role $kind $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
