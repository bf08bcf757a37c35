output "replicas" {
  description = "Per replica ID: endpoint (http://IP:PORT, public IP when there is one), cloud_id (instance ID), private_ip, public_ip, zone (zone ID), availability_zone (name) and market."
  value = {
    for id, inst in aws_instance.replica : id => {
      endpoint          = try("http://${coalesce(inst.public_ip, inst.private_ip)}:${var.port}", null)
      cloud_id          = try(inst.id, null)
      private_ip        = try(inst.private_ip, null)
      public_ip         = try(inst.public_ip, null)
      zone              = try(var.replicas[id].zone, null)
      availability_zone = try(inst.availability_zone, null)
      market            = try(var.replicas[id].market, null)
    }
  }
}

output "security_group_id" {
  description = "The security group opening the model server port."
  value       = try(aws_security_group.replicas.id, null)
}
