{{/*
The pod template the StatefulSet (one cache per pod) and the Deployment (cluster.enabled: one
cache in a bucket for every pod) share: metadata and spec, to be indented under template:.
*/}}
{{- define "mirror.podTemplate" -}}
metadata:
  labels:
    {{- include "mirror.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- if include "mirror.hasInlinePasswords" . }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- if include "mirror.hasClusterSecret" . }}
    checksum/cluster-secret: {{ include (print $.Template.BasePath "/cluster-secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "mirror.serviceAccountName" . }}
  automountServiceAccountToken: false
  {{- /* Service links would put MIRROR_*-looking variables for a Service named mirror in the
         environment, where the mirror reads its settings. */}}
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ include "mirror.terminationGracePeriod" . }}
  {{- with .Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- else }}
  {{- with include "mirror.clusterAffinity" . }}
  affinity:
    {{- . | trim | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: mirror
      image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["serve"]
      ports:
        - name: http
          containerPort: 5000
          protocol: TCP
        - name: metrics
          containerPort: 9090
          protocol: TCP
      env:
        - name: MIRROR_CONFIG
          value: /etc/mirror/config.yaml
        {{- if .Values.cluster.enabled }}
        {{- include "mirror.clusterEnv" . | trim | nindent 8 }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      startupProbe:
        httpGet:
          path: /healthz
          port: metrics
        {{- toYaml .Values.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        {{- toYaml .Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        {{- toYaml .Values.probes.readiness | nindent 8 }}
      {{- with .Values.preStopSleepSeconds }}
      lifecycle:
        preStop:
          exec:
            command: ["python", "-c", "import time; time.sleep({{ int64 . }})"]
      {{- end }}
      {{- with .Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: config
          mountPath: /etc/mirror/config.yaml
          subPath: config.yaml
          readOnly: true
        {{- if include "mirror.hasCredentials" . }}
        - name: secrets
          mountPath: /etc/mirror/secrets
          readOnly: true
        {{- end }}
        {{- if include "mirror.authEnabled" . }}
        - name: auth
          mountPath: /etc/mirror/auth
          readOnly: true
        {{- end }}
        {{- if .Values.tls.existingSecret }}
        - name: tls
          mountPath: /etc/mirror/tls
          readOnly: true
        {{- end }}
        {{- /* The cache, or in cluster mode the spool of downloads under way (the blobs are in
               the bucket): cache_dir either way. */}}
        - name: {{ ternary "spool" "cache" (not (empty .Values.cluster.enabled)) }}
          mountPath: /var/cache/mirror
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: config
      configMap:
        name: {{ include "mirror.fullname" . }}
    {{- if include "mirror.hasCredentials" . }}
    - name: secrets
      projected:
        defaultMode: 288  # 0440: read-only, for the owner and the fsGroup
        sources:
          {{- if include "mirror.hasInlinePasswords" . }}
          - secret:
              name: {{ include "mirror.secretName" . }}
              items:
                {{- range .Values.upstreams }}
                {{- if and .credentials .credentials.password }}
                - key: {{ include "mirror.secretKey" .name | toJson }}
                  path: {{ printf "%s/password" .name | toJson }}
                {{- end }}
                {{- end }}
          {{- end }}
          {{- range .Values.upstreams }}
          {{- if and .credentials .credentials.existingSecret }}
          - secret:
              name: {{ .credentials.existingSecret }}
              items:
                - key: {{ .credentials.passwordKey | default "password" | toJson }}
                  path: {{ printf "%s/password" .name | toJson }}
          {{- end }}
          {{- end }}
    {{- end }}
    {{- /* Whole directories, never subPath: the kubelet updates a Secret's files in place only
           without one, and the mirror re-reads the htpasswd file and the certificate when they
           change. */}}
    {{- if include "mirror.authEnabled" . }}
    - name: auth
      projected:
        defaultMode: 288  # 0440: read-only, for the owner and the fsGroup
        sources:
          {{- with .Values.auth.htpasswd.existingSecret }}
          - secret:
              name: {{ . }}
              items:
                - key: {{ $.Values.auth.htpasswd.key | default "htpasswd" | toJson }}
                  path: htpasswd
          {{- end }}
          {{- with .Values.auth.token.keySecret }}
          - secret:
              name: {{ . }}
              items:
                - key: {{ $.Values.auth.token.keySecretKey | default "token.key" | toJson }}
                  path: token.key
          {{- end }}
          {{- if include "mirror.hasAuthSecret" . }}
          - secret:
              name: {{ include "mirror.authSecretName" . }}
              items:
                {{- if .Values.auth.htpasswd.content }}
                - key: htpasswd
                  path: htpasswd
                {{- end }}
                {{- if not .Values.auth.token.keySecret }}
                - key: token.key
                  path: token.key
                {{- end }}
          {{- end }}
    {{- end }}
    {{- if .Values.tls.existingSecret }}
    - name: tls
      projected:
        defaultMode: 288  # 0440: read-only, for the owner and the fsGroup
        sources:
          - secret:
              name: {{ .Values.tls.existingSecret }}
              items:
                - key: tls.crt
                  path: tls.crt
                - key: tls.key
                  path: tls.key
          {{- with .Values.tls.clientCA.existingSecret }}
          - secret:
              name: {{ . }}
              items:
                - key: {{ $.Values.tls.clientCA.key | default "ca.crt" | toJson }}
                  path: ca.crt
          {{- end }}
    {{- end }}
    {{- if .Values.cluster.enabled }}
    - name: spool
      emptyDir:
        {{- with .Values.cluster.spool.sizeLimit }}
        sizeLimit: {{ . }}
        {{- else }} {}
        {{- end }}
    {{- else if not .Values.persistence.enabled }}
    - name: cache
      emptyDir:
        {{- with .Values.persistence.emptyDir.sizeLimit }}
        sizeLimit: {{ . }}
        {{- else }} {}
        {{- end }}
    {{- end }}
    - name: tmp
      emptyDir:
        {{- with .Values.tmpSizeLimit }}
        sizeLimit: {{ . }}
        {{- else }} {}
        {{- end }}
{{- end }}
