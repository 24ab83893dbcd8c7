{{/* Names and labels. */}}
{{- define "regproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "regproxy.fullname" -}}
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

{{- define "regproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "regproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "regproxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "regproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "regproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "regproxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "regproxy.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Fixed paths inside the container. */}}
{{- define "regproxy.cacheDir" -}}/var/lib/regproxy{{- end }}
{{- define "regproxy.configDir" -}}/etc/regproxy/config{{- end }}
{{- define "regproxy.secretsDir" -}}/etc/regproxy/secrets{{- end }}

{{/*
Combinations the chart refuses, with a message saying what to change. Included by every
workload template, so `helm template` and `helm install` fail before anything is applied.
*/}}
{{- define "regproxy.validate" -}}
{{- $v := .Values }}
{{- if gt (int $v.replicaCount) 1 }}
{{- if not (or $v.redis.url $v.redis.existingSecret) }}
{{- fail (printf "replicaCount is %d: more than one replica needs redis.url (or redis.existingSecret), through which the replicas share single flight and cache metadata" (int $v.replicaCount)) }}
{{- end }}
{{- /* With object storage the replicas share the bucket: no shared volume needed. */}}
{{- if not (include "regproxy.s3" .) }}
{{- if not $v.persistence.enabled }}
{{- fail (printf "replicaCount is %d: more than one replica needs persistence.enabled=true with a ReadWriteMany volume that all replicas share; each emptyDir would be a separate cache" (int $v.replicaCount)) }}
{{- end }}
{{- if not (has "ReadWriteMany" $v.persistence.accessModes) }}
{{- fail (printf "replicaCount is %d: more than one replica needs persistence.accessModes to include ReadWriteMany (got %s): every replica mounts the same cache volume (or use storage.s3)" (int $v.replicaCount) (toJson $v.persistence.accessModes)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if ge (int $v.drainDelaySeconds) (int $v.terminationGracePeriodSeconds) }}
{{- fail (printf "drainDelaySeconds (%d) must be less than terminationGracePeriodSeconds (%d): the pod would be killed while it drains, before finishing its downloads" (int $v.drainDelaySeconds) (int $v.terminationGracePeriodSeconds)) }}
{{- end }}
{{- $pdb := $v.podDisruptionBudget }}
{{- if and $pdb.enabled (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "string" $pdb.minAvailable)) (gt (int $v.replicaCount) 0) (ge (int $pdb.minAvailable) (int $v.replicaCount)) }}
{{- fail (printf "podDisruptionBudget.minAvailable is %d with replicaCount %d: no pod could ever be evicted, so node drains would hang; use at most replicaCount - 1 (or maxUnavailable)" (int $pdb.minAvailable) (int $v.replicaCount)) }}
{{- end }}
{{- if not $v.upstreams }}
{{- fail "upstreams is empty: configure at least one registry to pull from" }}
{{- end }}
{{- if not (hasKey $v.upstreams $v.defaultUpstream) }}
{{- fail (printf "defaultUpstream %q is not one of upstreams (%s)" $v.defaultUpstream (keys $v.upstreams | sortAlpha | join ", ")) }}
{{- end }}
{{- range $name, $u := $v.upstreams }}
{{- if and $u (not $u.url) }}
{{- fail (printf "upstreams.%s.url is required" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A Kubernetes quantity ("50Gi", "500M", "1.5Ti", "1073741824") in bytes, as a float64.
*/}}
{{- define "regproxy.bytes" -}}
{{- include "regproxy.bytesOf" (dict "name" "persistence.size" "value" .) }}
{{- end }}

{{/* The same for the setting named "name" with quantity "value" (named in the error). */}}
{{- define "regproxy.bytesOf" -}}
{{- $q := toString .value }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $scale := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 }}
{{- if or (not $num) (not (hasKey $scale $unit)) }}
{{- fail (printf "%s %q is not a Kubernetes quantity such as 50Gi" .name $q) }}
{{- end }}
{{- mulf (float64 $num) (get $scale $unit) }}
{{- end }}

{{/* "true" when the cache is on object storage (storage.s3.bucket set), else empty. */}}
{{- define "regproxy.s3" -}}
{{- if and .Values.storage .Values.storage.s3 .Values.storage.s3.bucket }}true{{ end }}
{{- end }}

{{/* storage: s3://BUCKET/PREFIX */}}
{{- define "regproxy.s3Location" -}}
{{- $s3 := .Values.storage.s3 }}
{{- printf "s3://%s/%s" $s3.bucket (trimAll "/" ($s3.prefix | default "")) | trimSuffix "/" }}
{{- end }}

{{/*
Size of a pod's work volume (with s3): storage.workVolume.size, else workMaxSize plus a quarter
for downloads in flight, in whole Mi.
*/}}
{{- define "regproxy.workVolumeSize" -}}
{{- $w := .Values.storage.workVolume }}
{{- if $w.size }}
{{- $w.size }}
{{- else }}
{{- $bytes := include "regproxy.bytesOf" (dict "name" "storage.workMaxSize" "value" .Values.storage.workMaxSize) | float64 }}
{{- printf "%.0fMi" (ceil (divf (mulf $bytes 1.25) 1048576.0)) }}
{{- end }}
{{- end }}

{{/*
cache.max_size: cache.maxSize as given, else cache.volumeFraction of persistence.size, in MiB.
*/}}
{{- define "regproxy.maxSize" -}}
{{- if .Values.cache.maxSize }}
{{- .Values.cache.maxSize }}
{{- else }}
{{- $bytes := include "regproxy.bytes" .Values.persistence.size | float64 }}
{{- printf "%.0fMiB" (floor (divf (mulf $bytes .Values.cache.volumeFraction) 1048576.0)) }}
{{- end }}
{{- end }}

{{/* Worker processes: .Values.workers, else the CPU limit rounded up (2, "1.5", "1500m"),
else nothing (regproxy then counts the CPUs it may run on). */}}
{{- define "regproxy.workers" -}}
{{- if .Values.workers }}
{{- int .Values.workers }}
{{- else }}
{{- $cpu := toString (((.Values.resources | default dict).limits | default dict).cpu | default "") }}
{{- if hasSuffix "m" $cpu }}
{{- int (ceil (divf (trimSuffix "m" $cpu | float64) 1000.0)) }}
{{- else if $cpu }}
{{- int (ceil ($cpu | float64)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret file of an upstream's password, as mounted by the Deployment. */}}
{{- define "regproxy.passwordFile" -}}
{{- printf "%s/%s/password" (include "regproxy.secretsDir" .root) .name }}
{{- end }}

{{/* config.yml: the regproxy configuration rendered from values. */}}
{{- define "regproxy.config" -}}
{{- $v := .Values }}
{{- $ups := dict }}
{{- range $name, $u := $v.upstreams }}
{{- if $u }}
{{- $e := dict "url" $u.url }}
{{- with $u.username }}{{ $_ := set $e "username" . }}{{ end }}
{{- if $u.existingSecret }}
{{- $_ := set $e "password_file" (include "regproxy.passwordFile" (dict "root" $ "name" $name)) }}
{{- end }}
{{- with $u.tagTTL }}{{ $_ := set $e "tag_ttl" . }}{{ end }}
{{- with $u.maxConnections }}{{ $_ := set $e "max_connections" . }}{{ end }}
{{- if hasKey $u "libraryPrefix" }}{{ $_ := set $e "library_prefix" $u.libraryPrefix }}{{ end }}
{{- $_ := set $ups $name $e }}
{{- end }}
{{- end }}
{{- $cache := dict "max_size" (include "regproxy.maxSize" .) "high_watermark" $v.cache.highWatermark "low_watermark" $v.cache.lowWatermark }}
{{- with $v.cache.pin }}{{ $_ := set $cache "pin" . }}{{ end }}
{{- with $v.cache.blobTTL }}{{ $_ := set $cache "blob_ttl" . }}{{ end }}
{{- $cfg := dict
  "listen" (printf ":%d" (int $v.containerPort))
  "drain_delay" (int $v.drainDelaySeconds)
  "storage" (include "regproxy.cacheDir" .)
  "tag_ttl" $v.tagTTL
  "log_level" $v.logLevel
  "offline" $v.offline
  "upstreams" $ups
  "default_upstream" $v.defaultUpstream
  "cache" $cache }}
{{- with include "regproxy.workers" . }}{{ $_ := set $cfg "workers" (int .) }}{{ end }}
{{- if include "regproxy.s3" . }}
{{- $s3 := $v.storage.s3 }}
{{- /* On S3, max_size bounds the whole bucket prefix: only when given (no volume to derive it from). */}}
{{- if not $v.cache.maxSize }}{{ $_ := unset $cache "max_size" }}{{ end }}
{{- $section := dict "redirect" $s3.redirect }}
{{- with $s3.endpoint }}{{ $_ := set $section "endpoint" . }}{{ end }}
{{- with $s3.region }}{{ $_ := set $section "region" . }}{{ end }}
{{- if not (kindIs "invalid" $s3.pathStyle) }}{{ $_ := set $section "path_style" $s3.pathStyle }}{{ end }}
{{- $_ := set $cfg "storage" (include "regproxy.s3Location" .) }}
{{- $_ := set $cfg "s3" $section }}
{{- $_ := set $cfg "work_dir" (include "regproxy.cacheDir" .) }}
{{- $_ := set $cfg "work_max_size" (toString $v.storage.workMaxSize) }}
{{- end }}
{{- if and $v.redis.url (not $v.redis.existingSecret) }}
{{- $_ := set $cfg "redis" (dict "url" $v.redis.url) }}
{{- end }}
{{- with $v.platforms }}{{ $_ := set $cfg "platforms" . }}{{ end }}
{{- $a := $v.auth | default dict }}
{{- $htpasswd := ($a.htpasswd | default dict).existingSecret }}
{{- if or $a.rules $htpasswd }}
{{- $auth := dict }}
{{- with $a.rules }}{{ $_ := set $auth "rules" . }}{{ end }}
{{- if $htpasswd }}
{{- $_ := set $auth "htpasswd" (printf "%s/htpasswd/htpasswd" (include "regproxy.secretsDir" .)) }}
{{- end }}
{{- $t := $a.token | default dict }}
{{- $token := dict }}
{{- if $t.existingSecret }}
{{- $_ := set $token "signing_key_file" (printf "%s/token/signing-key" (include "regproxy.secretsDir" .)) }}
{{- end }}
{{- with $t.realm }}{{ $_ := set $token "realm" . }}{{ end }}
{{- with $t.expiresIn }}{{ $_ := set $token "expires_in" . }}{{ end }}
{{- if $token }}{{ $_ := set $auth "token" $token }}{{ end }}
{{- with $a.loginLimit }}
{{- $_ := set $auth "login_limit" (dict "failures" (int .failures) "window" .window) }}
{{- end }}
{{- $_ := set $cfg "auth" $auth }}
{{- end }}
{{- with $v.sync }}{{ $_ := set $cfg "sync" . }}{{ end }}
{{- with $v.syncRatelimitFloor }}{{ $_ := set $cfg "sync_ratelimit_floor" (toString .) }}{{ end }}
{{- toYaml (mergeOverwrite $cfg (deepCopy $v.extraConfig)) }}
{{- end }}

{{/*
The address clients use, for NOTES.txt: the Ingress host, a fixed ClusterIP, or the in-cluster
DNS name.
*/}}
{{- define "regproxy.address" -}}
{{- if .Values.ingress.enabled }}
{{- (index .Values.ingress.hosts 0).host }}
{{- else if .Values.service.clusterIP }}
{{- printf "%s:%d" .Values.service.clusterIP (int .Values.service.port) }}
{{- else }}
{{- printf "%s.%s.svc.cluster.local:%d" (include "regproxy.fullname" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}
{{- end }}

{{- define "regproxy.scheme" -}}
{{- if and .Values.ingress.enabled .Values.ingress.tls }}https{{ else }}http{{ end }}
{{- end }}
