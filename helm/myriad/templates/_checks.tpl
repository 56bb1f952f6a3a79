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
{{- if and .Values.router.autoscaling.enabled .Values.router.keda.enabled -}}
{{- fail "router.autoscaling and router.keda both scale the routers: enable one" -}}
{{- end -}}
{{- $keda := .Values.router.keda -}}
{{- if and $keda.enabled (gt (int $keda.minReplicas) (int $keda.maxReplicas)) -}}
{{- fail (printf "router.keda.minReplicas (%d) exceeds maxReplicas (%d)" (int $keda.minReplicas) (int $keda.maxReplicas)) -}}
{{- end -}}
{{- $hpa := .Values.router.autoscaling -}}
{{- if and $hpa.enabled (gt (int $hpa.minReplicas) (int $hpa.maxReplicas)) -}}
{{- fail (printf "router.autoscaling.minReplicas (%d) exceeds maxReplicas (%d)" (int $hpa.minReplicas) (int $hpa.maxReplicas)) -}}
{{- end -}}
{{- range $role := list "coordinator" "worker" "router" "kvcache" "etcd" -}}
{{- $resources := (index $.Values $role).resources -}}
{{- range $kind := list "requests" "limits" -}}
{{- range $name, $quantity := (index $resources $kind | default dict) -}}
{{- if not (or (has $name (list "cpu" "memory" "ephemeral-storage")) (hasPrefix "hugepages-" $name) (contains "/" $name)) -}}
{{- fail (printf "%s.resources.%s.%s: extended resources need their vendor's domain, e.g. nvidia.com/gpu" $role $kind $name) -}}
{{- end -}}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$" (toString $quantity)) -}}
{{- fail (printf "%s.resources.%s.%s: `%v` is not a Kubernetes quantity (e.g. 500m, 64Gi, 2)" $role $kind $name $quantity) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $w := .Values.worker -}}
{{- if and $w.config.capacity $w.resources.limits $w.resources.limits.memory -}}
{{- if gt (include "myriad.sizeBytes" $w.config.capacity | float64) (include "myriad.quantityBytes" $w.resources.limits.memory | float64) -}}
{{- fail (printf "worker.config.capacity (%s) exceeds worker.resources.limits.memory (%s): a worker placed to its capacity would be OOM-killed" $w.config.capacity $w.resources.limits.memory) -}}
{{- end -}}
{{- end -}}
{{- $k := .Values.kvcache -}}
{{- if and $k.enabled $k.config.memory $k.resources.limits $k.resources.limits.memory -}}
{{- if gt (include "myriad.sizeBytes" $k.config.memory | float64) (include "myriad.quantityBytes" $k.resources.limits.memory | float64) -}}
{{- fail (printf "kvcache.config.memory (%s) exceeds kvcache.resources.limits.memory (%s)" $k.config.memory $k.resources.limits.memory) -}}
{{- end -}}
{{- end -}}
{{- if and $k.enabled $k.persistence.enabled $k.config.diskCapacity -}}
{{- if gt (include "myriad.sizeBytes" $k.config.diskCapacity | float64) (include "myriad.quantityBytes" $k.persistence.size | float64) -}}
{{- fail (printf "kvcache.config.diskCapacity (%s) exceeds kvcache.persistence.size (%s)" $k.config.diskCapacity $k.persistence.size) -}}
{{- end -}}
{{- end -}}
{{- $r := .Values.router -}}
{{- $grace := 30 -}}{{/* Kubernetes' default when unset */}}
{{- if not (kindIs "invalid" $r.terminationGracePeriodSeconds) -}}{{- $grace = $r.terminationGracePeriodSeconds -}}{{- end -}}
{{- $stop := addf (include "myriad.durationSeconds" $r.config.shutdownDelay | float64) (include "myriad.durationSeconds" $r.config.drainTimeout | float64) 2.0 -}}
{{- if gt $stop (float64 $grace) -}}
{{- fail (printf "router.config.shutdownDelay (%s) + drainTimeout (%s) + 2s to leave the cluster exceed router.terminationGracePeriodSeconds (%v): Kubernetes would kill a stopping router before it finished its responses" $r.config.shutdownDelay $r.config.drainTimeout $grace) -}}
{{- end -}}
{{- $m := .Values.model -}}
{{- if and $m.download.enabled (ne $m.source "pvc") -}}
{{- fail (printf "model.download fills a claim: set model.source to pvc (it is %s)" $m.source) -}}
{{- end -}}
{{- if and $m.download.enabled (eq $m.download.from "s3") (not (hasPrefix "s3://" $m.download.repository)) -}}
{{- fail (printf "model.download.repository (%s) must be an s3:// URL when model.download.from is s3" $m.download.repository) -}}
{{- end -}}
{{- if and (ne $m.source "image") (not (hasPrefix (printf "%s/" (trimSuffix "/" $m.mountPath)) $m.path)) -}}
{{- fail (printf "model.path (%s) is outside model.mountPath (%s), where the %s is mounted" $m.path $m.mountPath $m.source) -}}
{{- end -}}
{{- end -}}

{{/* Bytes of a Kubernetes quantity (64Gi, 500M, 2), as a number. */}}
{{- define "myriad.quantityBytes" -}}
{{- $q := toString . -}}
{{- $number := regexFind "^[0-9.]+" $q -}}
{{- $units := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 "m" 0.001 -}}
{{- mulf (float64 $number) (get $units (trimPrefix $number $q)) -}}
{{- end -}}

{{/* Bytes of a size as the binary reads it (24GiB, 500MB, 1024), as a number. */}}
{{- define "myriad.sizeBytes" -}}
{{- $s := toString . | replace " " "" -}}
{{- $number := regexFind "^[0-9.]+" $s -}}
{{- $units := dict "" 1.0 "b" 1.0 "kb" 1e3 "mb" 1e6 "gb" 1e9 "tb" 1e12 "kib" 1024.0 "mib" 1048576.0 "gib" 1073741824.0 "tib" 1099511627776.0 -}}
{{- mulf (float64 $number) (get $units (lower (trimPrefix $number $s))) -}}
{{- end -}}

{{/* Seconds of a duration as the binary reads it (6s, 1m30s, 500ms, 1.5h), as a number. */}}
{{- define "myriad.durationSeconds" -}}
{{- $units := dict "ns" 1e-9 "us" 1e-6 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "[0-9.]+[a-z]+" (toString .) -1 -}}
{{- $number := regexFind "^[0-9.]+" . -}}
{{- $total = addf $total (mulf (float64 $number) (get $units (trimPrefix $number .))) -}}
{{- end -}}
{{- $total -}}
{{- end -}}
